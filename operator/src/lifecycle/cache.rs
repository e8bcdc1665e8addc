//! Compact caches for the lifecycle controller: every pod of the cluster is
//! kept, so each costs as little as it can.
//!
//! A reflector `Store` keeps per object an `ObjectRef` (name, namespace,
//! uid and resourceVersion as strings) and the object with its whole
//! `ObjectMeta` (over 500 bytes before any string). Here a key is the
//! namespace (one shared `Arc<str>` per namespace) and the name, and pods
//! that look alike to the drift classification (the pods of one
//! ReplicaSet: same labels, same settings annotations, same proxy image,
//! same owner) share one [`Interner`]ed value.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

/// A namespaced object's name in a [`Cache`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The namespace, shared by every key of the namespace.
    pub namespace: Arc<str>,
    /// The name.
    pub name: Box<str>,
}

#[derive(Debug)]
struct State<V> {
    items: HashMap<Key, V>,
    /// The objects of a list in progress, which replace `items` when it ends.
    relisting: Option<HashMap<Key, V>>,
    namespaces: HashSet<Arc<str>>,
}

/// Reduced objects of one namespaced kind, filled from a watch
/// ([`Cache::apply`]); cheap to clone, every clone sees the same objects.
#[derive(Debug)]
pub struct Cache<V>(Arc<Mutex<State<V>>>);

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(State {
            items: HashMap::new(),
            relisting: None,
            namespaces: HashSet::new(),
        })))
    }
}

impl<V> Cache<V> {
    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one watch event, each object reduced by `reduce`; an object
    /// it reduces to `None` is not kept (and dropped if it was).
    pub fn apply<K: Resource>(&self, event: &Event<K>, reduce: impl Fn(&K) -> Option<V>) {
        let mut state = self.lock();
        let key = |state: &mut State<V>, object: &K| {
            let namespace = object.namespace().unwrap_or_default();
            let shared = match state.namespaces.get(namespace.as_str()) {
                Some(shared) => Arc::clone(shared),
                None => {
                    let shared: Arc<str> = namespace.into();
                    state.namespaces.insert(Arc::clone(&shared));
                    shared
                }
            };
            Key {
                namespace: shared,
                name: object.name_any().into(),
            }
        };
        match event {
            Event::Init => state.relisting = Some(HashMap::new()),
            Event::InitApply(object) => {
                let key = key(&mut state, object);
                if let Some(value) = reduce(object) {
                    state.relisting.get_or_insert_default().insert(key, value);
                }
            }
            Event::InitDone => {
                if let Some(items) = state.relisting.take() {
                    state.items = items;
                }
                let State {
                    items, namespaces, ..
                } = &mut *state;
                let live: HashSet<&Arc<str>> = items.keys().map(|k| &k.namespace).collect();
                namespaces.retain(|ns| live.contains(ns));
            }
            Event::Apply(object) => {
                let key = key(&mut state, object);
                match reduce(object) {
                    Some(value) => state.items.insert(key, value),
                    None => state.items.remove(&key),
                };
            }
            Event::Delete(object) => {
                let key = key(&mut state, object);
                state.items.remove(&key);
            }
        }
    }

    /// Runs `read` on the cached objects (under the cache's lock: no await
    /// inside, nothing slow).
    pub fn read<T>(&self, read: impl FnOnce(&HashMap<Key, V>) -> T) -> T {
        read(&self.lock().items)
    }

    /// The object cached as `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<V>
    where
        V: Clone,
    {
        let key = Key {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.lock().items.get(&key).cloned()
    }
}

/// Shares equal values: [`Interner::intern`] returns the `Arc` of an equal
/// value already held, so a thousand pods of one ReplicaSet hold one.
#[derive(Debug)]
pub struct Interner<T>(Arc<Mutex<HashSet<Arc<T>>>>);

impl<T> Clone for Interner<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(HashSet::new())))
    }
}

impl<T: Hash + Eq> Interner<T> {
    fn lock(&self) -> MutexGuard<'_, HashSet<Arc<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared `Arc` of a value equal to `value`.
    pub fn intern(&self, value: T) -> Arc<T> {
        let mut held = self.lock();
        if let Some(shared) = held.get(&value) {
            return Arc::clone(shared);
        }
        let shared = Arc::new(value);
        held.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets the values nobody else holds any more.
    pub fn collect(&self) {
        self.lock().retain(|v| Arc::strong_count(v) > 1);
    }

    /// How many distinct values are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;

    fn pod(ns: &str, name: &str, app: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": app}}}),
        )
        .expect("pod")
    }

    fn app(pod: &Pod) -> Option<String> {
        pod.metadata.labels.as_ref()?.get("app").cloned()
    }

    #[test]
    fn follows_a_watch_and_a_relist_replaces_everything() {
        let cache = Cache::default();
        cache.apply(&Event::Apply(pod("a", "p1", "web")), app);
        cache.apply(&Event::Apply(pod("a", "p2", "web")), app);
        cache.apply(&Event::Apply(pod("a", "p1", "api")), app);
        assert_eq!(cache.get("a", "p1").as_deref(), Some("api"));
        cache.apply(&Event::Delete(pod("a", "p2", "web")), app);
        assert_eq!(cache.get("a", "p2"), None);
        cache.apply(&Event::Init, app);
        cache.apply(&Event::InitApply(pod("b", "p3", "db")), app);
        assert_eq!(
            cache.get("a", "p1").as_deref(),
            Some("api"),
            "kept until the list ends"
        );
        cache.apply(&Event::InitDone, app);
        assert_eq!(cache.get("a", "p1"), None);
        assert_eq!(cache.get("b", "p3").as_deref(), Some("db"));
        assert_eq!(cache.read(HashMap::len), 1);
    }

    #[test]
    fn an_object_reduced_to_nothing_is_dropped() {
        let cache = Cache::default();
        cache.apply(&Event::Apply(pod("a", "p1", "web")), app);
        cache.apply(&Event::Apply(pod("a", "p1", "")), |p| {
            app(p).filter(|a| !a.is_empty())
        });
        assert_eq!(cache.read(HashMap::len), 0);
    }

    #[test]
    fn keys_of_a_namespace_share_its_name() {
        let cache = Cache::default();
        cache.apply(&Event::Apply(pod("shop", "p1", "web")), app);
        cache.apply(&Event::Apply(pod("shop", "p2", "web")), app);
        cache.read(|items| {
            let keys: Vec<&Key> = items.keys().collect();
            assert!(Arc::ptr_eq(&keys[0].namespace, &keys[1].namespace));
        });
    }

    #[test]
    fn equal_values_are_shared_until_nobody_holds_them() {
        let interner = Interner::default();
        let one = interner.intern(String::from("shape"));
        let two = interner.intern(String::from("shape"));
        assert!(Arc::ptr_eq(&one, &two));
        let other = interner.intern(String::from("other"));
        drop(other);
        interner.collect();
        assert_eq!(interner.len(), 1);
        drop((one, two));
        interner.collect();
        assert!(interner.is_empty());
    }
}
