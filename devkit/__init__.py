"""The local development kit: a broker and Redis on loopback, the CRM / success / ERP
sandbox, the traffic generator, the three-process pipeline, `make demo` and `make bench`."""
