//! Which role may do what.

use e2e::{fresh_pan, Client, Service};

use crate::{admin, card, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Tokenize,
    Batch,
    Metadata,
    Detokenize,
    Delete,
}

const OPS: [Op; 5] = [
    Op::Tokenize,
    Op::Batch,
    Op::Metadata,
    Op::Detokenize,
    Op::Delete,
];

/// The status of `op` for someone allowed to do it.
fn success_status(op: Op) -> u16 {
    match op {
        Op::Tokenize => 201,
        Op::Batch | Op::Metadata | Op::Detokenize => 200,
        Op::Delete => 204,
    }
}

fn run(op: Op, client: &Client, admin: &Client) -> (crate::Resp, String) {
    let pan = fresh_pan();
    let resp = match op {
        Op::Tokenize => client.tokenize(TENANT, &pan, 4, exp_year()),
        Op::Batch => client.batch(TENANT, &[card(&pan, 4, exp_year())]),
        // A token made by someone else, so the role is the only question.
        Op::Metadata => client.metadata(&token_for(admin, TENANT, &pan)),
        Op::Detokenize => client.detokenize(&token_for(admin, TENANT, &pan), REASON),
        Op::Delete => client.delete_token(&token_for(admin, TENANT, &pan)),
    };
    (resp, pan)
}

#[test]
fn role_matrix() {
    let svc = Service::start();
    let admin = admin(&svc);
    let allowed = |roles: &[&str], op: Op| -> bool {
        let has = |r: &str| roles.contains(&r);
        match op {
            Op::Tokenize | Op::Batch | Op::Metadata => has("tokenize"),
            Op::Detokenize => has("detokenize"),
            Op::Delete => has("tokenize") || has("detokenize"),
        }
    };
    let principals: &[(&str, &[&str])] = &[
        ("only-tokenize", &["tokenize"]),
        ("only-detokenize", &["detokenize"]),
        ("only-auditor", &["auditor"]),
        ("only-key-admin", &["key_admin"]),
        ("auditor-and-key-admin", &["auditor", "key_admin"]),
        (
            "everything",
            &["tokenize", "detokenize", "auditor", "key_admin"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, roles) in principals {
        let client = svc.principal_client(name, roles, &["*"]);
        for op in OPS {
            let (resp, pan) = run(op, &client, &admin);
            let want = if allowed(roles, op) {
                success_status(op)
            } else {
                403
            };
            let code_ok = want != 403 || resp.error_code() == Some("forbidden");
            // Only a successful detokenize may (and must) show the PAN.
            let pan_ok = if want == 200 && op == Op::Detokenize {
                resp.json["pan"] == pan.as_str()
            } else {
                !resp.text.contains(&pan)
            };
            if resp.status != want || !code_ok || !pan_ok {
                failures.push(format!("{name} {roles:?} {op:?}: want {want}, got {resp}"));
            }
            if resp.request_id.is_none() {
                failures.push(format!("{name} {op:?}: no x-request-id"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "role boundaries broken:\n{}",
        failures.join("\n")
    );
}

#[test]
fn detokenize_only_principal_cannot_learn_metadata_or_create() {
    let svc = Service::start();
    let admin = admin(&svc);
    let reader = svc.principal_client("reader", &["detokenize"], &[TENANT]);
    let pan = fresh_pan();
    let token = token_for(&admin, TENANT, &pan);
    let clear = reader.detokenize(&token, REASON);
    expect_status(&clear, 200);
    assert_eq!(clear.json["pan"], pan.as_str());
    expect_error(&reader.metadata(&token), 403, "forbidden", &[&pan]);
    // Even for a card that exists: no "already there" answer.
    expect_error(
        &reader.tokenize(TENANT, &pan, 12, exp_year()),
        403,
        "forbidden",
        &[&pan],
    );
    // And what was forbidden created nothing.
    let fresh = fresh_pan();
    expect_error(
        &reader.tokenize(TENANT, &fresh, 12, exp_year()),
        403,
        "forbidden",
        &[&fresh],
    );
    expect_status(&admin.tokenize(TENANT, &fresh, 12, exp_year()), 201);
}
