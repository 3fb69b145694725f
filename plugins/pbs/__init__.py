"""kasched's PBS plugin (server-side runjob / execjob_end hooks written against the ``pbs`` module)."""
