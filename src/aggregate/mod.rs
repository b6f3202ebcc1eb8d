//! The wallet domain, pure: ids, money, events, `decide` and `evolve`.
//!
//! Nothing in here does I/O, awaits or knows SQL. A wallet's state is only ever
//! the fold of its events (`Wallet::fold`); a command is turned into new events
//! by `decide`, which is the only place the business rules live. Everything at
//! the edges (store, ledger, HTTP, CLI) depends on this module, never the
//! other way round.

mod decide;
mod event;
mod money;
mod state;
mod wallet_id;

pub use decide::{decide, decide_each, Command, Decision, DomainError, StreamEvents, MAX_ATOMIC_OPS};
pub use event::{
    CreatedPayload, EventDecodeError, FundsPayload, HoldCapturedPayload, HoldPlacedPayload, HoldReleasedPayload,
    LimitsPayload, TransferPayload, WalletEvent, EVENT_SCHEMA_VERSION, EVENT_TYPES,
};
pub use money::{Amount, AmountError, Balance, MAX_AMOUNT_EXCLUSIVE, MONEY_SCALE};
pub use state::{Hold, Limits, Wallet, MAX_ACTIVE_HOLDS};
pub use wallet_id::{WalletId, WalletIdError, MAX_WALLET_ID_LEN};
