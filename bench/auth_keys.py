"""What an API key costs per call: ApiKeyTokens.authenticate (parse, one indexed SELECT
through the store on SQLite, the keyed hash compared in constant time, expiry and
revocation) against a development token, in process (no server), with N keys in the table.

A quick measurement for docs/architecture.md's identity section, not part of `make bench`
(SUITE): `python -m bench.auth_keys [--keys 1000] [--calls 3000]`. Every key's row is read
on every call on purpose (no cache, so a revocation holds on the next call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from metald.api.auth import ApiKeyTokens, Authenticator, DevTokens
from metald.core import apikeys
from metald.core.identity import Role
from metald.store.api_keys import SqlApiKeys
from metald.store.database import Database


async def measure(n_keys: int, calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database = Database(f"sqlite+aiosqlite:///{tmp}/metald.db")
        await database.migrate()
        try:
            keys, pepper = SqlApiKeys(database), os.urandom(32)
            tokens = []
            for i in range(n_keys):
                made = apikeys.new_key(
                    pepper, customer_id=f"c{i}", role=Role.CUSTOMER, now=time.time()
                )
                await keys.add(made.key)
                tokens.append(made.token)
            cases: list[tuple[str, Authenticator, list[str]]] = [
                (f"API key ({n_keys} in the table)", ApiKeyTokens(keys, pepper), tokens),
                ("development token", DevTokens(), ["dev_customer_acme"]),
            ]
            for name, auth, toks in cases:
                for token in toks[:100]:  # warm the pool and the statement cache
                    await auth.authenticate(token)
                wall, cpu = time.perf_counter(), time.process_time()
                for i in range(calls):
                    await auth.authenticate(toks[i % len(toks)])
                per_wall = (time.perf_counter() - wall) / calls * 1e6
                per_cpu = (time.process_time() - cpu) / calls * 1e6
                print(f"{name}: {per_wall:.0f} us wall, {per_cpu:.0f} us CPU per call")
        finally:
            await database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(measure(args.keys, args.calls))


if __name__ == "__main__":
    main()
