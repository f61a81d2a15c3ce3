"""Pretraining data: corpus files -> byte-level BPE tokens -> packed rows -> resumable batches."""
