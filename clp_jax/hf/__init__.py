"""Hugging Face checkpoint I/O: read into sharded arrays, write back atomically."""
