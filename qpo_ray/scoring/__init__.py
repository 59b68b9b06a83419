"""Scoring (query, prompt) pairs on the target LLM: `local` runs one backend in-process;
`ray_data` shards pairs over a pool of engine actors with Ray Data."""
