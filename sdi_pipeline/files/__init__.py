"""File primitives every layer uses: atomic writes (a temporary name, then a rename) and
content digests of files and records, with a stat-keyed cache."""
