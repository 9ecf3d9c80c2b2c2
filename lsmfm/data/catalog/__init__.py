"""Dataset catalogs: the YAML entries (`entries`), creating their stores (`materialize`), and the import
of the LSM foundation model paper's data layout (`paper`)."""
