//! `sqlx::migrate!` embeds the migration files at compile time; without
//! this, a change to a migration alone would not rebuild the binary.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
