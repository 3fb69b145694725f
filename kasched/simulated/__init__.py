"""The simulated hardware kind: nodes that answer like the lab's, with timings drawn from the lab's
measured figures and faults injected per node, behind the same driver and transport contracts as real
hardware, so that the real workflow, database, kaschedd and CLI run on them (docs/simulated.md)."""
