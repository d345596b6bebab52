"""PQF's Q: which weights, their subvector layout and statistics, k-means codebooks, the per-layer
quantizer, the pass over the model and the bit allocation under a size budget."""
