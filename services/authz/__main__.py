from services.authz.app import main

main()
