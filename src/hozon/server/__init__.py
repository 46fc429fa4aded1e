"""The backup server: owns the repositories (one per namespace), the catalog and the schedule.

Agents on hypervisors and in guests enrol once, then take jobs from it and write into its
repositories over HTTPS (docs/server.md). The server itself prunes, verifies and restores, with
the same ``repo``, ``backup`` and ``restore`` code the command line uses.
"""
