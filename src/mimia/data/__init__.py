"""Data: image sources, the role split and webdataset shards."""
