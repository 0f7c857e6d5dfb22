"""The jobs, one module each: ``query`` (sdi-query), ``worker`` (sdi-worker), ``score``
(sdi-score), ``merge`` (sdi-merge); ``context`` what they share, ``scores`` and ``scoring``
the scoring math and its shards, ``logs`` their log files, ``allocation`` what a scheduler
gave them. Every launcher runs these same functions.
"""

from sdi_pipeline.moved import moved_job_name as __getattr__  # noqa: F401  (old names)
