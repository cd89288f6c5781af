"""ingest: takes DICOM instances from `dicom.ingest`, validates them and has crypto seal them."""
