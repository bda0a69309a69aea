"""The row contract and what the job remembers about rows: manifest normalisation (one raw row
-> one typed row with its id, fingerprint and output key), the append-only row log, the compacted
state (latest record per id) and the digests that say a row did not change. No Ray stage here.
See docs/architecture.md."""
