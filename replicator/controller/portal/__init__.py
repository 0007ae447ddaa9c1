"""The controller's web console (docs/portal.md): static pages that use the REST API, and a live-update stream."""
