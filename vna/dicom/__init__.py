"""The DIMSE front-end (pynetdicom): thin handlers translating DIMSE <-> services."""
