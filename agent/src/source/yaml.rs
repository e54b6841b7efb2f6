//! Kubernetes YAML files: splitting into documents, decoding each strictly.
//!
//! A file is split at `---` lines so that one bad document does not hide the others. Each
//! document is parsed into a generic value (to learn its kind and name even when it is invalid),
//! then into its k8s-openapi type. k8s-openapi ignores fields it does not know, as the API
//! server's lenient decoding does; weft decodes strictly, like `kubectl apply
//! --validate=strict`: a field that does not survive the round trip through the type is an
//! unknown field and rejects the document (`store::strict`).
use serde_json::Value;

/// One document of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document<'a> {
    /// 0-based position in the file, empty documents included.
    pub index: usize,
    /// 1-based line of its first line.
    pub first_line: usize,
    pub text: &'a str,
}

/// Splits YAML text at document separators (`---` at the start of a line, optionally followed
/// by a comment or a space). Documents with nothing but comments and blank lines are dropped
/// but keep their index, so indexes match what an editor shows.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    let mut out = Vec::new();
    let (mut index, mut start, mut first_line, mut pos) = (0, 0, 1, 0);
    for (line_no, line) in (1..).zip(text.split_inclusive('\n')) {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let is_separator = trimmed == "---"
            || ["--- ", "---\t", "---#"]
                .iter()
                .any(|p| trimmed.starts_with(p));
        if is_separator {
            // A separator on the first line opens the first document; later ones close one.
            if line_no > 1 {
                push_document(&mut out, index, first_line, &text[start..pos]);
                index += 1;
            }
            start = pos + line.len();
            first_line = line_no + 1;
        }
        pos += line.len();
    }
    push_document(&mut out, index, first_line, &text[start..]);
    out
}

fn push_document<'a>(out: &mut Vec<Document<'a>>, index: usize, first_line: usize, text: &'a str) {
    let has_content = text.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#')
    });
    if has_content {
        out.push(Document {
            index,
            first_line,
            text,
        });
    }
}

/// Parses one document into a generic JSON value.
pub fn parse(doc: &str) -> Result<Value, serde_saphyr::Error> {
    serde_saphyr::from_str::<Value>(doc)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn splits_documents_and_keeps_indexes() {
        let text = "# leading comment\n---\nkind: A\n---\n# only a comment\n--- # sep with comment\nkind: B\n...\n";
        let docs = documents(text);
        let summary: Vec<(usize, usize, &str)> = docs
            .iter()
            .map(|d| (d.index, d.first_line, d.text.trim()))
            .collect();
        assert_eq!(summary, vec![(1, 3, "kind: A"), (3, 7, "kind: B\n...")]);
    }

    #[test]
    fn a_file_without_separators_is_one_document() {
        let docs = documents("kind: A\nmetadata:\n  name: x\n");
        assert_eq!(docs.len(), 1);
        assert_eq!((docs[0].index, docs[0].first_line), (0, 1));
    }

    #[test]
    fn dashes_inside_a_block_scalar_line_are_not_separators() {
        let docs = documents("kind: A\ndata: |\n  ----\n  ---x\n");
        assert_eq!(docs.len(), 1);
    }

    #[test]
    fn parses_yaml_numbers_and_strings_as_kubernetes_expects() {
        let v = parse("port: 80\ntargetPort: \"http\"\nname: \"on\"\n").expect("valid yaml");
        assert_eq!(v, json!({"port": 80, "targetPort": "http", "name": "on"}));
    }
}
