"""Code generated from proto/dembrane/webhooks/v1 by `make generate`; never edited by hand."""
