//! HTTP layer: request routing, query parsing, response rendering, and the
//! tower `Service` that `kube::Client` talks to.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::Inner;
use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::patch::PatchType;
use crate::resources::{Registry, ResourceDef};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, ListQuery, Propagation, Sub, WatchFrom};
use crate::util::{meta, percent_decode};
use crate::watch::{WatchOptions, watch_body};

/// Response body type of the embedded server.
pub(crate) type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// The tower service behind [`crate::EmbeddedApi::client`]. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedService {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedService").finish_non_exhaustive()
    }
}

impl tower::Service<http::Request<kube::client::Body>> for EmbeddedService {
    type Response = Response<UnsyncBoxBody<Bytes, Infallible>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    return Ok(error_response(&ApiError::bad_request(format!(
                        "failed to read request body: {e}"
                    ))));
                }
            };
            Ok(handle(&inner, &parts, bytes))
        })
    }
}

/// Render a stored object for a response: fix up kind/apiVersion for the
/// requested version, or reduce to `PartialObjectMetadata`.
pub(crate) fn render<'a>(obj: &'a Value, def: &ResourceDef, meta_only: bool) -> Cow<'a, Value> {
    if meta_only {
        return Cow::Owned(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta(obj).cloned().unwrap_or_default(),
        }));
    }
    let av = obj.get("apiVersion").and_then(Value::as_str);
    let kind = obj.get("kind").and_then(Value::as_str);
    if av == Some(def.api_version.as_str()) && kind == Some(def.kind.as_str()) {
        return Cow::Borrowed(obj);
    }
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(def.api_version.clone()));
        m.insert("kind".into(), Value::String(def.kind.clone()));
    }
    Cow::Owned(o)
}

fn response(code: u16, body: Vec<u8>, content_type: &'static str) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(code: u16, v: &Value) -> Response<RespBody> {
    response(
        code,
        serde_json::to_vec(v).unwrap_or_default(),
        "application/json",
    )
}

pub(crate) fn error_response(e: &ApiError) -> Response<RespBody> {
    json_response(e.code, &e.to_status())
}

struct Req<'a> {
    method: &'a Method,
    query: HashMap<String, String>,
    content_type: String,
    accept: String,
    body: Bytes,
}

impl Req<'_> {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true" | "1" | "True"))
    }

    fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }

    fn meta_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }

    fn json_body(&self) -> ApiResult<Value> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("the request body is empty"));
        }
        if self.content_type.contains("yaml") {
            serde_yaml::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        } else {
            serde_json::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}")))
        }
    }
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    m
}

/// Handle one request. Never panics; every failure is a `Status` response.
pub(crate) fn handle(inner: &Arc<Inner>, parts: &Parts, body: Bytes) -> Response<RespBody> {
    let header = |h| {
        parts
            .headers
            .get(h)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let req = Req {
        method: &parts.method,
        query: parse_query(parts.uri.query()),
        content_type: header(CONTENT_TYPE),
        accept: header(ACCEPT),
        body,
    };
    let segs: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match route(inner, &segs, &req) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn route(inner: &Arc<Inner>, segs: &[&str], req: &Req<'_>) -> ApiResult<Response<RespBody>> {
    let aggregated = req.accept.contains("as=APIGroupDiscoveryList");
    let discovery_doc = |f: &dyn Fn(&Registry) -> Option<Value>| -> ApiResult<Response<RespBody>> {
        inner.record("discovery", "get");
        if req.method != Method::GET {
            return Err(ApiError::method_not_allowed(req.method.as_str()));
        }
        let doc = f(&inner.lock().registry).ok_or_else(ApiError::not_found_path)?;
        if aggregated && doc.get("kind").and_then(Value::as_str) == Some("APIGroupDiscoveryList") {
            return Ok(response(
                200,
                serde_json::to_vec(&doc).unwrap_or_default(),
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            ));
        }
        Ok(json_response(200, &doc))
    };
    match segs {
        [] => discovery_doc(&|_| {
            Some(
                json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]}),
            )
        }),
        ["version"] => discovery_doc(&|_| Some(discovery::version())),
        ["healthz" | "livez" | "readyz", ..] => Ok(response(200, b"ok".to_vec(), "text/plain")),
        ["api"] => discovery_doc(&|r| {
            Some(if aggregated {
                discovery::aggregated(r, true)
            } else {
                discovery::api_versions()
            })
        }),
        ["apis"] => discovery_doc(&|r| {
            Some(if aggregated {
                discovery::aggregated(r, false)
            } else {
                discovery::api_group_list(r)
            })
        }),
        ["api", "v1"] => discovery_doc(&|r| Some(discovery::resource_list(r, "", "v1"))),
        ["apis", g] => discovery_doc(&|r| discovery::api_group(r, g)),
        ["apis", g, v] => discovery_doc(&|r| {
            r.has_group_version(g, v)
                .then(|| discovery::resource_list(r, g, v))
        }),
        ["api", "v1", rest @ ..] => resource(inner, "", "v1", rest, req),
        ["apis", g, v, rest @ ..] => resource(inner, g, v, rest, req),
        _ => {
            inner.record("unknown", "get");
            Err(ApiError::not_found_path())
        }
    }
}

enum Target {
    Collection {
        def: Arc<ResourceDef>,
        ns: Option<String>,
    },
    Item {
        def: Arc<ResourceDef>,
        ns: String,
        name: String,
        sub: Option<String>,
    },
}

fn resolve(reg: &Registry, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let lookup = |p: &str| {
        reg.lookup(group, version, p)
            .ok_or_else(ApiError::not_found_path)
    };
    let namespaced_lookup = |p: &str| reg.lookup(group, version, p).filter(|d| d.namespaced);
    let target = match rest {
        [p] => Target::Collection {
            def: lookup(p)?,
            ns: None,
        },
        ["namespaces", ns, p] if namespaced_lookup(p).is_some() => Target::Collection {
            def: lookup(p)?,
            ns: Some(ns.to_string()),
        },
        ["namespaces", ns, p, name] => Target::Item {
            def: namespaced_lookup(p).ok_or_else(ApiError::not_found_path)?,
            ns: ns.to_string(),
            name: name.to_string(),
            sub: None,
        },
        ["namespaces", ns, p, name, sub] => Target::Item {
            def: namespaced_lookup(p).ok_or_else(ApiError::not_found_path)?,
            ns: ns.to_string(),
            name: name.to_string(),
            sub: Some(sub.to_string()),
        },
        [p, name] | [p, name, _] => {
            let def = lookup(p)?;
            if def.namespaced {
                return Err(ApiError::not_found_path());
            }
            Target::Item {
                def,
                ns: String::new(),
                name: name.to_string(),
                sub: rest.get(2).map(|s| s.to_string()),
            }
        }
        _ => return Err(ApiError::not_found_path()),
    };
    Ok(target)
}

fn resource(
    inner: &Arc<Inner>,
    group: &str,
    version: &str,
    rest: &[&str],
    req: &Req<'_>,
) -> ApiResult<Response<RespBody>> {
    let (watch_prefix, rest) = match rest.split_first() {
        Some((&"watch", r)) => (true, r),
        _ => (false, rest),
    };
    let target = {
        let state = inner.lock();
        match resolve(&state.registry, group, version, rest) {
            Ok(t) => t,
            Err(e) => {
                drop(state);
                inner.record("unknown", &req.method.as_str().to_ascii_lowercase());
                return Err(e);
            }
        }
    };
    match target {
        Target::Collection { def, ns } => collection(inner, def, ns, req, watch_prefix, None),
        Target::Item {
            def,
            ns,
            name,
            sub: None,
        } if watch_prefix => {
            let ns = def.namespaced.then_some(ns);
            collection(inner, def, ns, req, true, Some(name))
        }
        Target::Item { def, ns, name, sub } => item(inner, def, ns, name, sub, req),
    }
}

fn list_query(req: &Req<'_>, pinned_name: Option<&str>) -> ApiResult<ListQuery> {
    let label = LabelSelector::parse(req.q("labelSelector").unwrap_or_default())
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let mut field_str = req.q("fieldSelector").unwrap_or_default().to_string();
    if let Some(n) = pinned_name {
        if !field_str.is_empty() {
            field_str.push(',');
        }
        field_str.push_str(&format!("metadata.name={n}"));
    }
    let field = FieldSelector::parse(&field_str).map_err(ApiError::bad_request)?;
    let limit = match req.q("limit").filter(|s| !s.is_empty()) {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    Ok(ListQuery {
        label,
        field,
        limit,
        cont: req.q("continue").map(str::to_string),
    })
}

fn list_body(
    def: &ResourceDef,
    items: &[Arc<Value>],
    rv: u64,
    cont: Option<String>,
    meta_only: bool,
) -> Vec<u8> {
    let (kind, av) = if meta_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (def.list_kind.clone(), def.api_version.clone())
    };
    let mut md = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        md["continue"] = Value::String(c);
    }
    let head = json!({"kind": kind, "apiVersion": av, "metadata": md});
    let mut buf = serde_json::to_vec(&head).unwrap_or_else(|_| b"{}".to_vec());
    buf.pop(); // the closing '}'
    buf.extend_from_slice(b",\"items\":[");
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = serde_json::to_writer(&mut buf, &render(it, def, meta_only));
    }
    buf.extend_from_slice(b"]}");
    buf
}

fn collection(
    inner: &Arc<Inner>,
    def: Arc<ResourceDef>,
    ns: Option<String>,
    req: &Req<'_>,
    watch_prefix: bool,
    pinned_name: Option<String>,
) -> ApiResult<Response<RespBody>> {
    let plural = def.plural.clone();
    let is_watch = watch_prefix || req.flag("watch");
    match *req.method {
        Method::GET if is_watch => {
            inner.record(&plural, "watch");
            let q = list_query(req, pinned_name.as_deref())?;
            let rv = req.q("resourceVersion").unwrap_or_default();
            let send_initial = req.flag("sendInitialEvents");
            let from = if send_initial || rv.is_empty() || rv == "0" {
                WatchFrom::Now
            } else {
                WatchFrom::After(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv:?}"))
                })?)
            };
            let timeout = match req.q("timeoutSeconds").filter(|s| !s.is_empty()) {
                Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
                })?)),
                None => None,
            }
            // 0 means "no client timeout" (the real server then picks its own).
            .filter(|t| !t.is_zero());
            let start = inner
                .lock()
                .watch_start(&def, ns.as_deref(), from, &q.label, &q.field);
            let opts = WatchOptions {
                namespace: ns,
                label: q.label,
                field: q.field,
                bookmarks: req.flag("allowWatchBookmarks"),
                timeout,
                meta_only: req.meta_only(),
                initial_events_end: send_initial,
            };
            let body = watch_body(inner, def, opts, start);
            let mut r = Response::new(body);
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
        Method::GET => {
            inner.record(&plural, "list");
            let q = list_query(req, pinned_name.as_deref())?;
            let page = inner.lock().list(&def, ns.as_deref(), &q)?;
            Ok(response(
                200,
                list_body(&def, &page.items, page.rv, page.cont, req.meta_only()),
                "application/json",
            ))
        }
        Method::POST => {
            inner.record(&plural, "create");
            if def.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let body = req.json_body()?;
            let obj = inner.lock().create(
                &def,
                ns.as_deref().unwrap_or_default(),
                body,
                req.dry_run(),
            )?;
            Ok(json_response(201, &render(&obj, &def, false)))
        }
        Method::DELETE => {
            inner.record(&plural, "deletecollection");
            let q = list_query(req, None)?;
            let opts = delete_opts(req)?;
            let (items, rv) = {
                let mut state = inner.lock();
                let items = state.delete_collection(&def, ns.as_deref(), &q, &opts)?;
                (items, state.rv)
            };
            Ok(response(
                200,
                list_body(&def, &items, rv, None, false),
                "application/json",
            ))
        }
        ref m => {
            inner.record(&plural, &m.as_str().to_ascii_lowercase());
            Err(ApiError::method_not_allowed(m.as_str()))
        }
    }
}

fn item(
    inner: &Arc<Inner>,
    def: Arc<ResourceDef>,
    ns: String,
    name: String,
    sub: Option<String>,
    req: &Req<'_>,
) -> ApiResult<Response<RespBody>> {
    let label = match &sub {
        Some(s) => format!("{}/{s}", def.plural),
        None => def.plural.clone(),
    };
    let verb = match (req.method.clone(), sub.as_deref()) {
        (Method::GET, _) => "get",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, _) => "delete",
        (Method::POST, _) => "create",
        _ => "unknown",
    };
    inner.record(&label, verb);
    let field_manager = req.q("fieldManager");
    let meta_only = req.meta_only();
    match sub.as_deref() {
        None | Some("status") => {
            let is_status = sub.is_some();
            if is_status && !def.status {
                return Err(ApiError::not_found_path());
            }
            let s = if is_status { Sub::Status } else { Sub::Main };
            match *req.method {
                Method::GET => {
                    let obj = inner.lock().get(&def, &ns, &name)?;
                    Ok(json_response(200, &render(&obj, &def, meta_only)))
                }
                Method::PUT => {
                    let body = req.json_body()?;
                    let (obj, created) =
                        inner
                            .lock()
                            .replace(&def, &ns, &name, body, s, req.dry_run())?;
                    Ok(json_response(
                        if created { 201 } else { 200 },
                        &render(&obj, &def, false),
                    ))
                }
                Method::PATCH => {
                    let pt = PatchType::from_content_type(&req.content_type)?;
                    let (obj, created) = inner.lock().patch(
                        &def,
                        &ns,
                        &name,
                        pt,
                        &req.body,
                        s,
                        field_manager,
                        req.dry_run(),
                    )?;
                    Ok(json_response(
                        if created { 201 } else { 200 },
                        &render(&obj, &def, meta_only),
                    ))
                }
                Method::DELETE if !is_status => {
                    let opts = delete_opts(req)?;
                    let obj = inner.lock().delete(&def, &ns, &name, &opts)?;
                    Ok(json_response(200, &render(&obj, &def, false)))
                }
                ref m => Err(ApiError::method_not_allowed(m.as_str())),
            }
        }
        Some("scale") if def.scale.is_some() => match *req.method {
            Method::GET => Ok(json_response(
                200,
                &inner.lock().get_scale(&def, &ns, &name)?,
            )),
            Method::PUT => {
                let body = req.json_body()?;
                let s = inner
                    .lock()
                    .update_scale(&def, &ns, &name, &body, req.dry_run())?;
                Ok(json_response(200, &s))
            }
            Method::PATCH => {
                let pt = PatchType::from_content_type(&req.content_type)?;
                let s = inner.lock().patch_scale(
                    &def,
                    &ns,
                    &name,
                    pt,
                    &req.body,
                    field_manager,
                    req.dry_run(),
                )?;
                Ok(json_response(200, &s))
            }
            ref m => Err(ApiError::method_not_allowed(m.as_str())),
        },
        Some("eviction") if def.is("", "pods") => {
            if *req.method != Method::POST {
                return Err(ApiError::method_not_allowed(req.method.as_str()));
            }
            let body = if req.body.is_empty() {
                json!({})
            } else {
                req.json_body()?
            };
            let body_name = body
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !body_name.is_empty() && body_name != name {
                return Err(ApiError::bad_request(format!(
                    "name in URL does not match name in Eviction object: {name} != {body_name}"
                )));
            }
            inner.lock().evict(&ns, &name, &body, req.dry_run())?;
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        Some(_) => Err(ApiError::not_found_path()),
    }
}

/// Parse `DeleteOptions` (from a request body or an Eviction's `deleteOptions`).
pub(crate) fn delete_opts_from_json(v: Option<&Value>) -> ApiResult<DeleteOpts> {
    let mut opts = DeleteOpts::default();
    let Some(v) = v.filter(|v| v.is_object()) else {
        return Ok(opts);
    };
    if v.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
        opts.propagation = Propagation::Orphan;
    }
    if let Some(p) = v.get("propagationPolicy").filter(|p| !p.is_null()) {
        opts.propagation = parse_propagation(p.as_str().unwrap_or_default())?;
    }
    if let Some(pre) = v.get("preconditions") {
        opts.uid = pre.get("uid").and_then(Value::as_str).map(str::to_string);
        opts.resource_version = pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if let Some(dr) = v.get("dryRun").and_then(Value::as_array) {
        opts.dry_run = dr.iter().any(|x| x.as_str() == Some("All"));
    }
    Ok(opts)
}

fn parse_propagation(p: &str) -> ApiResult<Propagation> {
    match p {
        "Orphan" => Ok(Propagation::Orphan),
        "Background" => Ok(Propagation::Background),
        "Foreground" => Ok(Propagation::Foreground),
        other => Err(ApiError::unprocessable(format!(
            "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: {other:?}: \
             supported values: \"Foreground\", \"Background\", \"Orphan\""
        ))),
    }
}

fn delete_opts(req: &Req<'_>) -> ApiResult<DeleteOpts> {
    let body: Option<Value> = if req.body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?,
        )
    };
    let mut opts = delete_opts_from_json(body.as_ref())?;
    if let Some(p) = req.q("propagationPolicy").filter(|p| !p.is_empty()) {
        opts.propagation = parse_propagation(p)?;
    }
    if req.flag("orphanDependents") {
        opts.propagation = Propagation::Orphan;
    }
    opts.dry_run |= req.dry_run();
    Ok(opts)
}
