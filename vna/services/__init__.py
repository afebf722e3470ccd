"""Services shared by every front-end: ingest, retrieve, query."""
