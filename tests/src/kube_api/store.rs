//! What the test API server holds: every object of every kind at one
//! global resourceVersion (as etcd's revision is), and the history of
//! changes since the last compaction, from which watches resume and
//! consistent lists (`Exact`, continue tokens) are rebuilt.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::Value;

use super::kinds::KINDS;

/// `(namespace, name)`, namespace "" for cluster-scoped kinds. Ordered as
/// etcd orders its keys, so lists come out as the real server's do.
pub(crate) type Key = (String, String);

/// One stored object version, serialized once and shared by every list
/// and watch that sends it.
#[derive(Debug)]
pub(crate) struct Object {
    pub key: Key,
    pub labels: BTreeMap<String, String>,
    /// Field-selector labels and their values.
    pub fields: Vec<(&'static str, String)>,
    pub resource_version: u64,
    pub uid: Option<String>,
    pub created: Option<Time>,
    /// As a watch event or a GET sends it: with `apiVersion` and `kind`.
    pub json: String,
    /// As a list item: the real server leaves `apiVersion` and `kind` out
    /// of a typed list's items.
    item: Item,
}

#[derive(Debug)]
enum Item {
    /// `{` + `json[n..]`: k8s-openapi writes apiVersion and kind first.
    Tail(usize),
    Own(String),
}

impl Object {
    /// An object of `kind` with metadata `meta`, serialized as `json`.
    /// Only kinds selectable by more than metadata read `json` again.
    pub fn new(kind: usize, meta: &ObjectMeta, json: String) -> Object {
        let spec = &KINDS[kind];
        let key = (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let value = if spec.fields.is_empty() {
            None
        } else {
            serde_json::from_str::<Value>(&json).ok()
        };
        let item = item_form(kind, &json);
        Object {
            fields: spec.field_values(&key.0, &key.1, value.as_ref()),
            key,
            labels: meta.labels.clone().unwrap_or_default(),
            resource_version: meta
                .resource_version
                .as_deref()
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0),
            uid: meta.uid.clone(),
            created: meta.creation_timestamp.clone(),
            json,
            item,
        }
    }

    /// An object of `kind` from its JSON (apiVersion and kind included).
    pub fn from_json(kind: usize, json: String) -> Object {
        let meta = serde_json::from_str::<Value>(&json)
            .ok()
            .and_then(|mut v| v.get_mut("metadata").map(Value::take))
            .and_then(|m| serde_json::from_value::<ObjectMeta>(m).ok())
            .unwrap_or_default();
        Object::new(kind, &meta, json)
    }

    /// Appends the list-item form to `out`.
    pub fn write_item(&self, out: &mut String) {
        match &self.item {
            Item::Tail(n) => {
                out.push('{');
                out.push_str(&self.json[*n..]);
            }
            Item::Own(s) => out.push_str(s),
        }
    }

    /// This object's JSON with `metadata.resourceVersion` set to `rv`, as
    /// a DELETED event carries the last state at the deletion's version.
    pub fn json_at(&self, rv: u64) -> String {
        match serde_json::from_str::<Value>(&self.json) {
            Ok(mut value) => {
                if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
                }
                value.to_string()
            }
            // Our own serialization; it always parses.
            Err(_) => self.json.clone(),
        }
    }
}

fn item_form(kind: usize, json: &str) -> Item {
    let spec = &KINDS[kind];
    let prefix = format!(
        "{{\"apiVersion\":\"{}\",\"kind\":\"{}\",",
        spec.api_version(),
        spec.kind
    );
    if json.starts_with(&prefix) {
        return Item::Tail(prefix.len());
    }
    let mut value: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    Item::Own(value.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change, at its resourceVersion.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: usize,
    pub change: Change,
    /// The new state; for Deleted, the last state at the deletion's version.
    pub object: Arc<Object>,
    /// The state before (for Modified and Deleted).
    pub previous: Option<Arc<Object>>,
}

/// A resourceVersion older than the history kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    /// Versions from here on are still known.
    pub oldest: u64,
}

#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    /// History at or before this version is forgotten.
    compacted: u64,
    objects: Vec<BTreeMap<Key, Arc<Object>>>,
    /// Every change after `compacted` (and older ones an open watch still
    /// needs), oldest first.
    history: VecDeque<Event>,
    /// Open watches and the version each has sent up to: their events are
    /// kept through a compaction, as a real watch cache keeps serving
    /// watches it already has.
    watches: HashMap<u64, u64>,
    next_watch: u64,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            rv: 0,
            compacted: 0,
            objects: KINDS.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            watches: HashMap::new(),
            next_watch: 0,
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// The version the next change will get.
    pub fn next_version(&self) -> u64 {
        self.rv + 1
    }

    pub fn get(&self, kind: usize, key: &Key) -> Option<&Arc<Object>> {
        self.objects[kind].get(key)
    }

    /// Stores `object` (made at [`Store::next_version`]) and records the change.
    pub fn put(&mut self, kind: usize, object: Object) -> u64 {
        self.rv += 1;
        let object = Arc::new(object);
        let previous = self.objects[kind].insert(object.key.clone(), object.clone());
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            change: if previous.is_some() {
                Change::Modified
            } else {
                Change::Added
            },
            object,
            previous,
        });
        self.rv
    }

    /// Removes the object at `key`; `last` makes the DELETED event's object
    /// from the removed one and the deletion's version.
    pub fn remove(
        &mut self,
        kind: usize,
        key: &Key,
        last: impl FnOnce(&Object, u64) -> Object,
    ) -> Option<u64> {
        let previous = self.objects[kind].remove(key)?;
        self.rv += 1;
        let object = Arc::new(last(&previous, self.rv));
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            change: Change::Deleted,
            object,
            previous: Some(previous),
        });
        Some(self.rv)
    }

    /// Forgets the history up to now.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.prune();
    }

    fn prune(&mut self) {
        let keep_from = self
            .watches
            .values()
            .copied()
            .min()
            .unwrap_or(u64::MAX)
            .min(self.compacted);
        while self.history.front().is_some_and(|e| e.rv <= keep_from) {
            self.history.pop_front();
        }
    }

    /// Registers an open watch that has sent everything up to `position`.
    pub fn open_watch(&mut self, position: u64) -> u64 {
        self.next_watch += 1;
        self.watches.insert(self.next_watch, position);
        self.next_watch
    }

    pub fn close_watch(&mut self, id: u64) {
        self.watches.remove(&id);
        self.prune();
    }

    /// The changes after `position` (any kind), and the version they reach;
    /// the watch `id` is then recorded as having sent them.
    pub fn events_after(&mut self, id: u64, position: u64) -> (Vec<Event>, u64) {
        let first = self.history.partition_point(|e| e.rv <= position);
        let events: Vec<Event> = self.history.range(first..).cloned().collect();
        if let Some(p) = self.watches.get_mut(&id) {
            *p = self.rv;
        }
        self.prune();
        (events, self.rv)
    }

    /// The objects of `kind` as they were at `at` (now when None): the
    /// live map when nothing of that kind changed since, else a copy with
    /// the later changes undone.
    pub fn snapshot(
        &self,
        kind: usize,
        at: Option<u64>,
    ) -> Result<Cow<'_, BTreeMap<Key, Arc<Object>>>, Expired> {
        let Some(at) = at.filter(|at| *at < self.rv) else {
            return Ok(Cow::Borrowed(&self.objects[kind]));
        };
        if at < self.compacted {
            return Err(Expired {
                oldest: self.compacted,
            });
        }
        let first = self.history.partition_point(|e| e.rv <= at);
        let later: Vec<&Event> = self
            .history
            .range(first..)
            .filter(|e| e.kind == kind)
            .collect();
        if later.is_empty() {
            return Ok(Cow::Borrowed(&self.objects[kind]));
        }
        let mut objects = self.objects[kind].clone();
        for event in later.into_iter().rev() {
            match &event.previous {
                Some(previous) => objects.insert(previous.key.clone(), previous.clone()),
                None => objects.remove(&event.object.key),
            };
        }
        Ok(Cow::Owned(objects))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str, rv: u64, app: &str) -> Object {
        let value = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(),
                         "labels": {"app": app}},
        });
        Object::from_json(0, value.to_string())
    }

    fn names(map: &BTreeMap<Key, Arc<Object>>) -> Vec<(String, String)> {
        map.values()
            .map(|o| (o.key.1.clone(), o.labels["app"].clone()))
            .collect()
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut store = Store::default();
        let v1 = store.put(0, service("a", 1, "one"));
        store.put(0, service("b", 2, "one"));
        let v3 = store.put(0, service("a", 3, "two"));
        store.remove(0, &("ns".into(), "b".into()), |o, rv| {
            Object::new(
                0,
                &serde_json::from_str(&o.json_at(rv)).unwrap(),
                o.json_at(rv),
            )
        });
        assert_eq!(
            names(&store.snapshot(0, None).unwrap()),
            [("a".into(), "two".into())]
        );
        assert_eq!(
            names(&store.snapshot(0, Some(v3)).unwrap()),
            [("a".into(), "two".into()), ("b".into(), "one".into())]
        );
        assert_eq!(
            names(&store.snapshot(0, Some(v1)).unwrap()),
            [("a".into(), "one".into())]
        );
        assert!(store.snapshot(0, Some(0)).unwrap().is_empty());
        store.compact();
        assert_eq!(
            store.snapshot(0, Some(v3)).err(),
            Some(Expired { oldest: 4 })
        );
    }

    #[test]
    fn compaction_keeps_what_open_watches_need() {
        let mut store = Store::default();
        store.put(0, service("a", 1, "one"));
        let id = store.open_watch(1);
        store.put(0, service("a", 2, "two"));
        store.compact();
        let (events, upto) = store.events_after(id, 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].change, Change::Modified);
        assert_eq!(upto, 2);
        // Sent: nothing older is kept any more.
        assert!(store.history.is_empty());
        store.close_watch(id);
    }

    #[test]
    fn list_items_leave_out_type() {
        let object = service("a", 1, "one");
        let mut out = String::new();
        object.write_item(&mut out);
        let item: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(item.get("kind"), None);
        assert_eq!(item["metadata"]["name"], "a");
        assert_eq!(object.resource_version, 1);
        assert_eq!(object.key, ("ns".to_owned(), "a".to_owned()));
    }
}
