"""The transports of a deployment: tree exec over SSH (:mod:`kasched.transports.tree`) and the chain
broadcast of an image through a TCP pipeline of nodes (:mod:`kasched.transports.chain`)."""
