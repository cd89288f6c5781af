from services.crypto.app import main

main()
