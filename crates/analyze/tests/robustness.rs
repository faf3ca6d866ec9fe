//! Robustness of everything that reads what users write: the object reader, the translation
//! istiod-lite runs, the status facts its controller writes and the analyzer take any object
//! without panicking. The inputs are the corpus (`tests/fixtures/analyze/**.yaml` and Istio's
//! canary example), each file mutated by proptest: a field removed, a scalar replaced by a value of
//! another type or an odd string, an element duplicated, a node wrapped in a list or an object, a
//! value copied to another place, a field grafted onto another object. A failure shrinks to the
//! fewest mutations that still panic and names the file. Bounded: `PROPTEST_CASES` cases (default
//! 256) from a fixed seed, so a run is repeatable; set `PROPTEST_RNG_SEED` to explore others.

#[path = "../../../tests/support/seeded.rs"]
mod seeded;

use ambit_analyze::{Options, analyze};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::Value;

/// Every corpus file as its documents (JSON values), with its name.
fn seeds() -> Vec<(String, Vec<Value>)> {
    seeded::corpus(env!("CARGO_MANIFEST_DIR"))
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let documents = serde_yaml_ng::Deserializer::from_str(&text)
                .filter_map(|d| Value::deserialize(d).ok())
                .filter(|v| !v.is_null())
                .collect();
            (
                path.file_name().unwrap().to_string_lossy().into(),
                documents,
            )
        })
        .collect()
}

/// Values a user (or a broken tool) might put anywhere.
fn odd_values() -> Vec<Value> {
    let long = "x".repeat(300);
    [
        Value::Null,
        Value::Bool(true),
        0.into(),
        (-1).into(),
        65536.into(),
        4_294_967_296u64.into(),
        u64::MAX.into(),
        (-9_223_372_036_854_775_807i64).into(),
        1.5.into(),
        serde_json::json!([]),
        serde_json::json!({}),
    ]
    .into_iter()
    .chain(
        [
            "",
            " ",
            "*",
            "/",
            "//",
            "a/b/c",
            ":",
            "::",
            "[",
            "(",
            "\\",
            ".",
            "..",
            "-",
            "0",
            "-1",
            "65536",
            "1e999",
            "10.0.0.300",
            "10.0.0.1/33",
            "0.0.0.0/0",
            "::/0",
            "1h",
            "-5s",
            "999999999999999999999s",
            "1.5ms",
            "ALLOW",
            "DENY",
            "CUSTOM",
            "AUDIT",
            "Exact",
            "PathPrefix",
            "RegularExpression",
            "istio-waypoint",
            "All",
            "Same",
            "Selector",
            "In",
            "Exists",
            "none",
            "all",
            "HBONE",
            "spiffe://",
            "ns/name",
            "é",
            "日本",
            "💥",
            "\u{0}",
            "a\nb",
            &long,
        ]
        .into_iter()
        .map(Value::from),
    )
    .collect()
}

/// One change to a document tree; indexes are taken modulo what exists when it applies.
#[derive(Clone, Debug)]
enum Mutation {
    Remove {
        node: usize,
    },
    Replace {
        node: usize,
        value: usize,
    },
    Duplicate {
        node: usize,
    },
    WrapInList {
        node: usize,
    },
    WrapInObject {
        node: usize,
    },
    Truncate {
        node: usize,
        at: usize,
    },
    CopyFrom {
        node: usize,
        from: usize,
    },
    /// Adds another node's field (its key and value) to an object: fields travel between objects.
    Graft {
        node: usize,
        from: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let n = any::<usize>;
    prop_oneof![
        n().prop_map(|node| Mutation::Remove { node }),
        (n(), n()).prop_map(|(node, value)| Mutation::Replace { node, value }),
        n().prop_map(|node| Mutation::Duplicate { node }),
        n().prop_map(|node| Mutation::WrapInList { node }),
        n().prop_map(|node| Mutation::WrapInObject { node }),
        (n(), n()).prop_map(|(node, at)| Mutation::Truncate { node, at }),
        (n(), n()).prop_map(|(node, from)| Mutation::CopyFrom { node, from }),
        (n(), n()).prop_map(|(node, from)| Mutation::Graft { node, from }),
    ]
}

/// A path to a node: keys and indexes from the root.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every node below the root, depth first.
fn paths(value: &Value) -> Vec<Vec<Step>> {
    fn walk(value: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    at.push(Step::Key(k.clone()));
                    out.push(at.clone());
                    walk(v, at, out);
                    at.pop();
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    at.push(Step::Index(i));
                    out.push(at.clone());
                    walk(v, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

fn node_mut<'a>(root: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, step| match step {
        Step::Key(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

fn apply(documents: &mut [Value], m: &Mutation, odd: &[Value]) {
    // The node: counted across the documents, so every document can be hit.
    let all: Vec<(usize, Vec<Step>)> = documents
        .iter()
        .enumerate()
        .flat_map(|(d, v)| paths(v).into_iter().map(move |p| (d, p)))
        .collect();
    if all.is_empty() {
        return;
    }
    let pick = |i: usize| all[i % all.len()].clone();
    match m {
        Mutation::Remove { node } => {
            let (d, path) = pick(*node);
            let (last, parent) = path.split_last().expect("a node below the root");
            if let Some(parent) = node_mut(&mut documents[d], parent) {
                match (parent, last) {
                    (Value::Object(map), Step::Key(k)) => {
                        map.remove(k);
                    }
                    (Value::Array(items), Step::Index(i)) if *i < items.len() => {
                        items.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        Mutation::Replace { node, value } => {
            let (d, path) = pick(*node);
            if let Some(v) = node_mut(&mut documents[d], &path) {
                *v = odd[value % odd.len()].clone();
            }
        }
        Mutation::Duplicate { node } => {
            let (d, path) = pick(*node);
            if let Some(Value::Array(items)) = node_mut(&mut documents[d], &path)
                && let Some(first) = items.first().cloned()
            {
                items.push(first);
            }
        }
        Mutation::WrapInList { node } => {
            let (d, path) = pick(*node);
            if let Some(v) = node_mut(&mut documents[d], &path) {
                *v = Value::Array(vec![v.take()]);
            }
        }
        Mutation::WrapInObject { node } => {
            let (d, path) = pick(*node);
            if let Some(v) = node_mut(&mut documents[d], &path) {
                *v = serde_json::json!({ "x": v.take() });
            }
        }
        Mutation::Truncate { node, at } => {
            let (d, path) = pick(*node);
            if let Some(Value::String(s)) = node_mut(&mut documents[d], &path) {
                let cut = s
                    .char_indices()
                    .map(|(i, _)| i)
                    .nth(at % (s.chars().count() + 1))
                    .unwrap_or(s.len());
                s.truncate(cut);
            }
        }
        Mutation::Graft { node, from } => {
            let (from_d, from_path) = pick(*from);
            let Some(Step::Key(key)) = from_path.last().cloned() else {
                return;
            };
            let Some(value) = node_mut(&mut documents[from_d], &from_path).map(|v| v.clone())
            else {
                return;
            };
            let (d, path) = pick(*node);
            if let Some(Value::Object(map)) = node_mut(&mut documents[d], &path) {
                map.insert(key, value);
            }
        }
        Mutation::CopyFrom { node, from } => {
            let (from_d, from_path) = pick(*from);
            let Some(value) = node_mut(&mut documents[from_d], &from_path).map(|v| v.clone())
            else {
                return;
            };
            let (d, path) = pick(*node);
            if let Some(v) = node_mut(&mut documents[d], &path) {
                *v = value;
            }
        }
    }
}

/// Everything that reads the objects, as istiod-lite and `ambitctl analyze` run it.
fn read_translate_and_analyze(documents: &[Value]) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for d in documents {
        let (o, e) = ambit_mesh::parse_object(d.clone(), "fuzz");
        objects.extend(o);
        errors.extend(e);
    }
    let cluster = Cluster::from_objects(objects.clone());
    let resources = translate(&cluster, &MeshSettings::default());
    let _ = resources.warning_texts();
    let _ = ambit_mesh::status::route_parents(&cluster, &resources);
    let _ = ambit_mesh::status::service_bindings(&cluster);
    for deployed in [false, true] {
        let options = Options {
            deployed,
            ..Options::default()
        };
        for finding in analyze(&objects, &errors, &options) {
            let _ = finding.to_string();
        }
    }
}

#[test]
fn mutated_corpus_objects_never_panic_the_reader_translation_status_or_analyzer() {
    let seeds = seeds();
    assert!(
        seeds.len() >= 10,
        "the corpus is in {}",
        seeded::fixtures(env!("CARGO_MANIFEST_DIR")).display()
    );
    let odd = odd_values();
    let mut runner = seeded::runner(256);
    let strategy = (0..seeds.len(), proptest::collection::vec(mutation(), 1..8));
    let result = runner.run(&strategy, |(file, mutations)| {
        let (_, documents) = &seeds[file];
        let mut documents = documents.clone();
        for m in &mutations {
            apply(&mut documents, m, &odd);
        }
        let caught = std::panic::catch_unwind(|| read_translate_and_analyze(&documents));
        prop_assert!(
            caught.is_ok(),
            "{} with {:?} panicked; documents:\n{}",
            seeds[file].0,
            mutations,
            serde_json::to_string_pretty(&documents).unwrap_or_default()
        );
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
