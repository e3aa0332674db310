"""SeqIO task and mixture registries (the T0 P3 mixture and the ELM inventory), registered lazily."""
