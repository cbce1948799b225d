"""The chunk repository: packs, index, manifests and gc over a storage backend."""
