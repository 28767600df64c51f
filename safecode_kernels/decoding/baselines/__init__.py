"""The baselines the fused decoder is checked and measured against: the naive loop (two full
forwards per steered step, no cache) and the sequential two-cache loop. They use the public
request encoding and cache helpers only, nothing private of the decoder."""
