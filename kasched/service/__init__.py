"""kaschedd: the site service. It owns the database, the BMC credentials and the engine, and serves
the typed API over HTTP (a Unix socket, identity from the kernel) to the CLI and to other clients."""
