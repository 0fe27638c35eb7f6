"""The on-disk run: the per-phase store, atomic writes, the manifest and weight I/O."""
