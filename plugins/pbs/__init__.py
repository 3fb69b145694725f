"""kasched's PBS plugin: a server hook (queuejob, runjob, jobobit) written against the ``pbs`` module,
the adapter that reads its jobs, and the release of the vnodes it held (``pbsnodes``)."""
