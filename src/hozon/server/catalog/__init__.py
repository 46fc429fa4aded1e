"""The server's catalog: namespaces, agents, jobs, runs and the snapshots they made (SQLAlchemy 2).

SQLite in the server directory by default; PostgreSQL to scale out (several servers, one catalog).
The schema is created and upgraded by Alembic migrations (``migrations/``), never by create_all.
"""
