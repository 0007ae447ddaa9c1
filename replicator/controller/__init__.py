"""replicator-controller: the management plane's store, REST API and job queue (docs/management-plane.md)."""
