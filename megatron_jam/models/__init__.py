"""JAM models: parent decoders and the fusion methods (one file per method)."""
