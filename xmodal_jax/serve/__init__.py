"""The retrieval service over an export: a framework-free Searcher and its HTTP app."""
