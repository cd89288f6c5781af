"""DICOM rules shared by every way in (Kafka topic, STOW-RS)."""
