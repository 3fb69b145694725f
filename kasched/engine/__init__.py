"""The deployment engine's transports: tree exec over SSH (:mod:`kasched.engine.tree`) and the chain
broadcast of an image through a TCP pipeline of nodes (:mod:`kasched.engine.chain`)."""
