"""The lab: a virtual cluster on one machine that speaks real DHCP/TFTP, IPMI and SSH (docs/lab.md)."""
