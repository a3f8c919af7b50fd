//! `docs/configuration.md` lists every flag of `ringfeed-node`, `ringfeed-node drain`
//! and `ringfeed-router` with its environment variable, default and meaning, as clap
//! (which `--help` prints) knows them. The tables between the `<!-- flags: … -->`
//! markers are generated from the binaries' own definitions; this test fails when they
//! differ. To regenerate them after changing a flag:
//!
//! ```text
//! RINGFEED_UPDATE_DOCS=1 cargo test -p ringfeed-cluster-tests --test configuration
//! ```

use std::path::PathBuf;

use clap::CommandFactory;

/// The doc's path.
fn doc() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md")
}

/// A Markdown table of `command`'s flags, in their declared order.
fn table(command: &clap::Command) -> String {
    let mut out =
        String::from("| flag | environment | default | meaning |\n| --- | --- | --- | --- |\n");
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let env = arg
            .get_env()
            .map_or_else(String::new, |e| format!("`{}`", e.to_string_lossy()));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match (defaults.is_empty(), arg.is_required_set()) {
            (false, _) => format!("`{}`", defaults.join(",")),
            (true, true) => "required".to_owned(),
            (true, false) if !arg.get_action().takes_values() => "off".to_owned(),
            (true, false) => "unset".to_owned(),
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!("| `--{long}` | {env} | {default} | {help} |\n"));
    }
    out
}

/// `text` with the block after `<!-- flags: name -->`, up to `<!-- end -->`, replaced
/// by `block`.
fn with_block(text: &str, name: &str, block: &str) -> String {
    let open = format!("<!-- flags: {name} -->\n");
    let start = text
        .find(&open)
        .unwrap_or_else(|| panic!("docs/configuration.md has no `{}` marker", open.trim()))
        + open.len();
    let end = text[start..]
        .find("<!-- end -->")
        .map(|e| e + start)
        .expect("an end marker");
    format!("{}{}{}", &text[..start], block, &text[end..])
}

#[test]
fn the_configuration_doc_lists_every_flag_as_the_binaries_define_it() {
    let commands = [
        ("ringfeed-node", ringfeed_node::config::Config::command()),
        (
            "ringfeed-node drain",
            ringfeed_node::admin::DrainArgs::command(),
        ),
        (
            "ringfeed-router",
            ringfeed_router::config::Config::command(),
        ),
    ];
    let text = std::fs::read_to_string(doc()).expect("docs/configuration.md");
    let mut expected = text.clone();
    for (name, command) in &commands {
        expected = with_block(&expected, name, &table(command));
    }
    if std::env::var_os("RINGFEED_UPDATE_DOCS").is_some() {
        std::fs::write(doc(), &expected).expect("write docs/configuration.md");
        return;
    }
    assert!(
        text == expected,
        "docs/configuration.md differs from the flags; regenerate it with \
         RINGFEED_UPDATE_DOCS=1 cargo test -p ringfeed-cluster-tests --test configuration"
    );
}

#[test]
fn a_flag_missing_from_the_doc_is_noticed() {
    let command = clap::Command::new("x").arg(
        clap::Arg::new("depth")
            .long("depth")
            .env("X_DEPTH")
            .default_value("3")
            .help("How | deep."),
    );
    let doc = "intro\n<!-- flags: x -->\nold\n<!-- end -->\nrest\n";
    let updated = with_block(doc, "x", &table(&command));
    assert_ne!(updated, doc);
    assert!(updated.contains("| `--depth` | `X_DEPTH` | `3` | How \\| deep. |"));
    assert!(updated.ends_with("<!-- end -->\nrest\n"));
}
