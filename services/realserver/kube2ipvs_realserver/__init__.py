"""Realserver: holds VIPs on loopback and DNATs VIP:port to local pods with one owned nftables table.

`plan` (pure: desired state and ops), `kernel` (the only kernel adapter, and its fake), `app`
(the loop, health, /config, metrics), `main` (`kube2ipvs realserver`). See the README.
"""
