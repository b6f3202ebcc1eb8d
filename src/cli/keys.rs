//! `wallet keys`: makes an API key. Touches no database.

use clap::Args;

use crate::api;

#[derive(Args, Debug)]
pub struct KeysArgs {
    /// Name of the client, shown in logs and 403 answers.
    #[arg(long)]
    pub name: String,
    /// Scopes joined by '+': read, write, admin.
    #[arg(long, default_value = "read+write")]
    pub scopes: String,
}

pub(super) fn run(args: KeysArgs) -> anyhow::Result<()> {
    let key = format!("wk_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let entry = api::ApiKeys::entry(&args.name, &args.scopes, &key);
    api::ApiKeys::parse(&entry)?;
    println!("key (give it to the client; it is not stored anywhere):\n  {key}");
    println!("entry (add to API_KEYS, comma-separated, or as a line of API_KEYS_FILE):\n  {entry}");
    Ok(())
}
