"""The transfer engine: control protocol, buckets, checksums, process groups, client and server."""
