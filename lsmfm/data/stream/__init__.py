"""Patch streaming for pretraining: every config of the stream (`config`), where each sample comes from
(`sampling`), augmentation (`augment`) and the dataset and loader (`dataset`); the per-patch chunk read
is `lsmfm.io.chunk_reader`."""
