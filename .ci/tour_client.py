"""README's Tour, walked through a client generated from /openapi.json.

Usage: tour_client.py BASE_URL WRITE_KEY READ_KEY

Run by .ci/run against a fresh service (empty SQLite, API keys on): WRITE_KEY
has the admin scope, READ_KEY only read. Every answer is checked against what
README shows; the first mismatch fails the run with what was expected and got.
"""

import datetime
import sys

from wallet_client import AuthenticatedClient
from wallet_client.api.holds import batch, capture, limits, place, void
from wallet_client.api.read_models import flags, history, stats, wallet_flags, wallet_holds
from wallet_client.api.system import health, ready
from wallet_client.api.wallet import balance, deposit, transfer, withdraw
from wallet_client.models import (
    BatchBody,
    CaptureBody,
    FlagsRule,
    HoldBody,
    LimitsBody,
    MoneyBody,
    OperationBody,
    ProblemBody,
    TransferBody,
    VoidBody,
    WalletHoldsStatus,
)

STEPS = 0


def check(what, got, expected):
    global STEPS
    STEPS += 1
    if got != expected:
        sys.exit(f"tour: {what}: expected {expected!r}, got {got!r}")


def answer(what, response, status, fields=None):
    """The parsed body of `response`, after checking its status and `fields`."""
    check(f"{what}: status", response.status_code, status)
    body = response.parsed
    if fields:
        shown = body.to_dict()
        for name, value in fields.items():
            check(f"{what}: {name}", shown.get(name), value)
    return body


def problem(what, response, status, code):
    body = answer(what, response, status)
    check(f"{what}: problem+json", response.headers.get("content-type"), "application/problem+json")
    check(f"{what}: a ProblemBody", isinstance(body, ProblemBody), True)
    check(f"{what}: code", body.code, code)
    return body


def money(client):
    r = deposit.sync_detailed("alice", client=client, body=MoneyBody(amount="150.50", request_id="r1"))
    answer("deposit", r, 201, {"walletId": "alice", "balance": "150.5000", "requestId": "r1",
                               "created": True, "position": 2})
    check("deposit: X-Audit-Id", bool(r.headers.get("x-audit-id")), True)
    r = withdraw.sync_detailed("alice", client=client, body=MoneyBody(amount=20, request_id="r2"))
    answer("withdraw (amount as a JSON number)", r, 201,
           {"balance": "130.5000", "created": False, "position": 3})
    r = transfer.sync_detailed("alice", client=client,
                               body=TransferBody(to_wallet_id="bob", amount="25", request_id="r3"))
    answer("transfer", r, 201, {"fromWalletId": "alice", "toWalletId": "bob", "amount": "25.0000",
                                "status": "completed", "requestId": "r3", "fromBalance": "105.5000",
                                "toBalance": "25.0000", "position": 6})
    r = balance.sync_detailed("alice", client=client)
    answer("balance", r, 200, {"balance": "105.5000", "available": "105.5000", "held": "0.0000",
                               "minBalance": "0.0000", "exists": True, "version": 4})
    answer("balance at=2", balance.sync_detailed("alice", client=client, at=2), 200,
           {"balance": "150.5000", "exists": True, "version": 2})
    past = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    answer("balance at=2024-01-01T00:00:00Z", balance.sync_detailed("alice", client=client, at=past), 200,
           {"balance": "0.0000", "exists": False, "version": 0})
    answer("an unknown wallet", balance.sync_detailed("nobody", client=client), 200,
           {"exists": False, "balance": "0.0000"})


def idempotency(client):
    r = deposit.sync_detailed("alice", client=client, body=MoneyBody(amount="150.50", request_id="r1"))
    answer("replayed deposit", r, 201, {"balance": "150.5000", "position": 2})
    check("replayed deposit: Idempotent-Replayed", r.headers.get("idempotent-replayed"), "true")
    r = deposit.sync_detailed("alice", client=client, body=MoneyBody(amount="1"), idempotency_key="r1")
    problem("key reused for another amount", r, 422, "IDEMPOTENCY_KEY_REUSED")
    r = withdraw.sync_detailed("alice", client=client, body=MoneyBody(amount="1000000"))
    problem("withdraw beyond the balance", r, 400, "INSUFFICIENT_FUNDS")
    r = withdraw.sync_detailed("nobody", client=client, body=MoneyBody(amount="1"))
    problem("withdraw from an unknown wallet", r, 404, "WALLET_NOT_FOUND")
    r = deposit.sync_detailed("alice", client=client, body=MoneyBody(amount="0.00005"))
    problem("an amount with 5 decimals", r, 400, "INVALID_AMOUNT")
    problem("limit 0", history.sync_detailed("alice", client=client, limit=0), 400, "INVALID_LIMIT")


def read_models(client):
    r = history.sync_detailed("alice", client=client, limit=2, min_position=6)
    items = answer("history", r, 200)
    check("history: newest first", [(i.type_, i.version, i.balance_after) for i in items],
          [("TransferDebited", 4, "105.5000"), ("FundsWithdrawn", 3, "130.5000")])
    check("history: X-Next-Before", r.headers.get("x-next-before"), "3")
    check("history: X-Projection-Position >= 6", int(r.headers.get("x-projection-position")) >= 6, True)
    r = history.sync_detailed("alice", client=client, limit=2, before=3)
    check("history page 2", [i.type_ for i in answer("history page 2", r, 200)],
          ["FundsDeposited", "WalletCreated"])
    answer("stats", stats.sync_detailed("alice", client=client, min_position=6), 200,
           {"totalDeposited": "150.5000", "totalWithdrawn": "20.0000", "totalTransferredOut": "25.0000",
            "totalTransferredIn": "0.0000", "depositCount": 1, "withdrawalCount": 1,
            "transferOutCount": 1, "transferInCount": 0, "suspicious": False})


def fraud(client):
    answer("carol deposit", deposit.sync_detailed("carol", client=client, body=MoneyBody(amount="20000")), 201)
    r = withdraw.sync_detailed("carol", client=client, body=MoneyBody(amount="12000"))
    answer("carol withdraw", r, 201, {"balance": "8000.0000", "position": 9})
    found = answer("carol's flags", wallet_flags.sync_detailed("carol", client=client, min_position=9), 200)
    check("carol's flags", [(f.rule, f.position, f.reason) for f in found],
          [("LARGE_OUTFLOW", 9, "single outflow of 12000.0000 (threshold 10000)")])
    r = flags.sync_detailed(client=client, wallet_id="carol", rule=FlagsRule.LARGE_OUTFLOW, limit=20,
                            before="10:LARGE_OUTFLOW")
    check("all flags, filtered", [f.position for f in answer("all flags", r, 200)], [9])
    answer("carol's stats", stats.sync_detailed("carol", client=client, min_position=9), 200,
           {"suspicious": True})


def holds(client):
    answer("rider deposit", deposit.sync_detailed("rider", client=client, body=MoneyBody(amount="100")), 201)
    body = HoldBody(amount="40", expires_in_seconds=900, to_wallet_id="driver", request_id="h1")
    held = answer("hold", place.sync_detailed("rider", client=client, body=body), 201,
                  {"amount": "40.0000", "status": "held", "toWalletId": "driver", "balance": "100.0000",
                   "available": "60.0000", "requestId": "h1"})
    r = capture.sync_detailed("rider", held.hold_id, client=client, body=CaptureBody(amount="25"))
    captured = answer("capture", r, 201, {"status": "captured", "captured": "25.0000", "released": "15.0000",
                               "balance": "75.0000", "available": "75.0000", "toBalance": "25.0000"})
    r = void.sync_detailed("rider", held.hold_id, client=client, body=VoidBody())
    problem("void a captured hold", r, 409, "HOLD_NOT_ACTIVE")
    r = wallet_holds.sync_detailed("rider", client=client, status=WalletHoldsStatus.CAPTURED,
                                   min_position=captured.position)
    check("captured holds", [str(h.hold_id) for h in answer("captured holds", r, 200)], [str(held.hold_id)])
    r = limits.sync_detailed("rider", client=client, body=LimitsBody(min_balance="10", max_balance="10000"))
    answer("limits", r, 201, {"minBalance": "10.0000", "maxBalance": "10000.0000"})
    answer("balance with limits", balance.sync_detailed("rider", client=client), 200,
           {"balance": "75.0000", "available": "75.0000", "held": "0.0000", "minBalance": "10.0000",
            "maxBalance": "10000.0000"})
    r = withdraw.sync_detailed("rider", client=client, body=MoneyBody(amount="70"))
    problem("withdraw below minBalance", r, 400, "MIN_BALANCE_BREACHED")


def batches(client):
    ops = [OperationBody(op="deposit", wallet_id="a", amount="10"),
           OperationBody(op="transfer", wallet_id="a", to_wallet_id="b", amount="5", request_id="t1")]
    r = batch.sync_detailed(client=client, body=BatchBody(atomic=True, request_id="b1", operations=ops))
    done = answer("atomic batch", r, 201, {"atomic": True})
    check("atomic batch: statuses", [x.status for x in done.results], [201, 201])
    ops = [OperationBody(op="deposit", wallet_id="a", amount="1", request_id="k1"),
           OperationBody(op="withdraw", wallet_id="a", amount="999")]
    done = answer("independent batch", batch.sync_detailed(client=client, body=BatchBody(operations=ops)), 200)
    check("independent batch: statuses", [x.status for x in done.results], [201, 400])
    check("independent batch: problem", done.results[1].problem.code, "INSUFFICIENT_FUNDS")


def access(base, reader):
    anonymous = AuthenticatedClient(base_url=base, token="not-a-key", raise_on_unexpected_status=True)
    r = balance.sync_detailed("alice", client=anonymous)
    problem("no valid key", r, 401, "UNAUTHORIZED")
    check("401: WWW-Authenticate", r.headers.get("www-authenticate"), "Bearer")
    answer("a read key reads", balance.sync_detailed("alice", client=reader), 200, {"exists": True})
    r = deposit.sync_detailed("alice", client=reader, body=MoneyBody(amount="1"))
    problem("a read key writes", r, 403, "FORBIDDEN")
    answer("health", health.sync_detailed(client=anonymous), 200)
    answer("ready", ready.sync_detailed(client=anonymous), 200)


def main():
    base, write_key, read_key = sys.argv[1:4]
    client = AuthenticatedClient(base_url=base, token=write_key, raise_on_unexpected_status=True)
    reader = AuthenticatedClient(base_url=base, token=read_key, raise_on_unexpected_status=True)
    money(client)
    idempotency(client)
    read_models(client)
    fraud(client)
    holds(client)
    batches(client)
    access(base, reader)
    print(f"tour: {STEPS} checks passed")


if __name__ == "__main__":
    main()
