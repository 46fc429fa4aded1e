"""The agent: enrols once with a server, then takes its jobs and writes into its namespace's repository.

It runs where the data is (a hypervisor, a guest) and holds only its own credential and its
namespace's repository password; the server keeps everything else (docs/server.md).
"""
