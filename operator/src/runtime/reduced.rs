//! Caches of reduced objects: the operator keeps of a watched kind only
//! what it reads ([`crate::workloads::injected_pod`],
//! [`crate::workloads::registered_entry`]).
//! A reduced type stands for its kind to the API (`reduced_resource!`)
//! and each watch event is mapped to it ([`reduce`]) before the reflector
//! stores it.

use kube::runtime::watcher::Event;

/// A watch event with its object reduced to `R`.
pub fn reduce<K, R: From<K>>(event: Event<K>) -> Event<R> {
    match event {
        Event::Apply(object) => Event::Apply(object.into()),
        Event::Delete(object) => Event::Delete(object.into()),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(object.into()),
        Event::InitDone => Event::InitDone,
    }
}

/// Implements `kube::Resource` for a reduced type with a `metadata` field,
/// as the same kind, group, version and plural as the full type.
macro_rules! reduced_resource {
    ($reduced:ty, $full:ty) => {
        impl kube::Resource for $reduced {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::kind(&())
            }

            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::group(&())
            }

            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::version(&())
            }

            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::plural(&())
            }

            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }

            fn meta_mut(
                &mut self,
            ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use reduced_resource;
