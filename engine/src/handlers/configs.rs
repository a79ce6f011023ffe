//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics and
//! the broker.
//!
//! Answered by any shard. Describe reads the shard's current metadata image
//! (shared read-only). Changes are validated here (so validate_only never
//! reaches the controller), then sent to the controller on shard 0, which
//! re-applies them to its newest image, persists it and waits until every
//! shard applied it: when the response arrives, the new settings are live
//! on every log. Definitions and resolution live in `topic_config`.

use std::rc::Rc;

use tidelog_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use tidelog_protocol::messages::{
    alter_configs_response, incremental_alter_configs_response, AlterConfigsRequest, AlterConfigsResponse, ApiKey,
    DescribeConfigsRequest, DescribeConfigsResponse, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use tidelog_protocol::ErrorCode;

use super::{encode, str_bytes, Response};
use crate::metadata::{MetadataImage, TopicMeta};
use crate::shard::Shard;
use crate::topic_config::{
    self as tc, apply_ops, ConfigChange, ConfigOp, ConfigResource, Resolved, SOURCE_DEFAULT, TOPIC_CONFIGS,
};

pub const RESOURCE_TOPIC: i8 = 2;
pub const RESOURCE_BROKER: i8 = 4;

/// What a DescribeConfigs request asked to be included.
#[derive(Clone, Copy)]
pub struct Want {
    pub version: i16,
    pub synonyms: bool,
    pub doc: bool,
}

fn entry(
    want: Want,
    name: &str,
    chain: Vec<Resolved>,
    read_only: bool,
    config_type: i8,
    doc: &str,
) -> DescribeConfigsResourceResult {
    let (version, want_synonyms, want_doc) = (want.version, want.synonyms, want.doc);
    let first = chain.first().cloned();
    let (value, source) = first.map(|r| (r.value, r.source)).unwrap_or((String::new(), SOURCE_DEFAULT));
    let mut out = DescribeConfigsResourceResult::default()
        .with_name(str_bytes(name))
        .with_value(Some(str_bytes(&value)))
        .with_read_only(read_only)
        .with_config_source(source);
    if want_synonyms {
        out.synonyms = chain
            .into_iter()
            .map(|r| {
                DescribeConfigsSynonym::default()
                    .with_name(str_bytes(&r.name))
                    .with_value(Some(str_bytes(&r.value)))
                    .with_source(r.source)
            })
            .collect();
    }
    if version >= 3 {
        out.config_type = config_type;
        if want_doc {
            out.documentation = Some(str_bytes(doc));
        }
    }
    out
}

/// Every config of a topic with its effective value and source (used by
/// DescribeConfigs and CreateTopics v5+).
pub fn describe_topic(
    shard: &Shard,
    image: &MetadataImage,
    meta: &TopicMeta,
    want: Want,
) -> Vec<DescribeConfigsResourceResult> {
    TOPIC_CONFIGS
        .iter()
        .map(|def| {
            let chain = tc::topic_synonyms(&shard.config, image, meta, def);
            entry(want, def.name, chain, false, def.kind.config_type(), def.doc)
        })
        .collect()
}

fn describe_broker(shard: &Shard, image: &MetadataImage, want: Want) -> Vec<DescribeConfigsResourceResult> {
    crate::config::SETTINGS
        .iter()
        .map(|s| {
            // Dynamic values are cluster-wide (one store, every shard applies
            // them), so a broker id reports them as Kafka reports a cluster
            // default it has no override for: DYNAMIC_DEFAULT_BROKER_CONFIG.
            let chain = tc::broker_synonyms(&shard.config, image, s.name);
            let dynamic = tc::broker_dynamic_def(s.name);
            let kind = dynamic.map(|d| d.kind.config_type()).unwrap_or(tc::TYPE_STRING);
            entry(want, s.name, chain, dynamic.is_none(), kind, s.doc)
        })
        .collect()
}

/// A broker resource names this node's brokers: "" (the cluster default) or
/// the id of one of this node's shards (node.id x 1000 + shard).
fn broker_id_ok(shard: &Shard, name: &str) -> bool {
    name.is_empty()
        || name.parse::<i32>().is_ok_and(|id| {
            let (node, s) = crate::metadata::split_broker_id(id);
            id >= 0 && node == shard.config.node_id && (s as usize) < shard.num_shards
        })
}

pub fn describe_configs(shard: &Rc<Shard>, version: i16, cid: i32, req: DescribeConfigsRequest) -> Response {
    let image = shard.image();
    let want = Want {
        version,
        synonyms: version >= 1 && req.include_synonyms,
        doc: version >= 3 && req.include_documentation,
    };
    let results = req
        .resources
        .into_iter()
        .map(|res| {
            let out = DescribeConfigsResult::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name.clone());
            let name = res.resource_name.as_str();
            let fail = |out: DescribeConfigsResult, code: ErrorCode, msg: String| {
                shard.metrics.error(ApiKey::DescribeConfigs, code.code());
                out.with_error_code(code.code()).with_error_message(Some(str_bytes(&msg)))
            };
            let configs = match res.resource_type {
                RESOURCE_TOPIC => match image.topics.get(name) {
                    Some(meta) => describe_topic(shard, &image, meta, want),
                    None => {
                        return fail(out, ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist"))
                    }
                },
                RESOURCE_BROKER => {
                    if !broker_id_ok(shard, name) {
                        return fail(out, ErrorCode::InvalidRequest, format!("no broker with id {name:?}"));
                    }
                    describe_broker(shard, &image, want)
                }
                other => {
                    return fail(out, ErrorCode::InvalidRequest, format!("resource type {other} is not supported"))
                }
            };
            let configs = match &res.configuration_keys {
                Some(keys) => {
                    configs.into_iter().filter(|c| keys.iter().any(|k| k.as_str() == c.name.as_str())).collect()
                }
                None => configs,
            };
            out.with_configs(configs)
        })
        .collect();
    encode(ApiKey::DescribeConfigs, version, cid, &DescribeConfigsResponse::default().with_results(results))
}

/// One resource's change after local checks, or the error to answer.
type Checked = Result<ConfigChange, (ErrorCode, String)>;

/// Resolves the resource and dry-runs the change against this shard's image.
fn check(
    shard: &Shard,
    image: &MetadataImage,
    resource_type: i8,
    name: &str,
    replace: bool,
    ops: Result<Vec<ConfigOp>, String>,
) -> Checked {
    let ops = ops.map_err(|e| (ErrorCode::InvalidRequest, e))?;
    let resource = match resource_type {
        RESOURCE_TOPIC => {
            if !image.topics.contains_key(name) {
                return Err((ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist")));
            }
            ConfigResource::Topic(name.to_string())
        }
        RESOURCE_BROKER => {
            if !broker_id_ok(shard, name) {
                return Err((ErrorCode::InvalidRequest, format!("no broker with id {name:?}")));
            }
            ConfigResource::Broker
        }
        other => return Err((ErrorCode::InvalidRequest, format!("resource type {other} is not supported"))),
    };
    let change = ConfigChange { resource, replace, ops };
    let dry = match &change.resource {
        ConfigResource::Topic(t) => {
            let meta = image.topics.get(t).cloned();
            let current = meta.as_ref().map(|m| m.configs.clone()).unwrap_or_default();
            let effective =
                |k: &str| meta.as_ref().map(|m| tc::topic_value(&shard.config, image, m, k)).unwrap_or_default();
            apply_ops(&current, &change, &effective)
        }
        ConfigResource::Broker => apply_ops(&image.broker_configs, &change, &|k| {
            tc::broker_synonyms(&shard.config, image, k).into_iter().next().map(|r| r.value).unwrap_or_default()
        }),
    };
    dry.map_err(|e| (ErrorCode::InvalidConfig, e))?;
    Ok(change)
}

/// Sends the checked changes (unless validate_only) and returns one outcome per resource.
async fn run_changes(
    shard: &Rc<Shard>,
    key: ApiKey,
    checked: Vec<Checked>,
    validate_only: bool,
) -> Vec<Option<(ErrorCode, String)>> {
    let mut outcome: Vec<Option<(ErrorCode, String)>> = checked.iter().map(|c| c.as_ref().err().cloned()).collect();
    if !validate_only {
        let (idx, changes): (Vec<usize>, Vec<ConfigChange>) =
            checked.into_iter().enumerate().filter_map(|(i, c)| c.ok().map(|c| (i, c))).unzip();
        if !changes.is_empty() {
            let results = shard.alter_configs(changes).await;
            for (k, i) in idx.iter().enumerate() {
                outcome[*i] = match results.get(k) {
                    Some((_, Ok(_))) => None,
                    Some((_, Err(e))) => Some(e.clone()),
                    None => Some((ErrorCode::UnknownServerError, "the controller did not answer".into())),
                };
            }
        }
    }
    for (code, msg) in outcome.iter().flatten() {
        log::warn!("{key:?}: {} ({msg})", code.name());
        shard.metrics.error(key, code.code());
    }
    outcome
}

pub async fn alter_configs(shard: Rc<Shard>, version: i16, cid: i32, req: AlterConfigsRequest) -> Response {
    let image = shard.image();
    let checked: Vec<Checked> = req
        .resources
        .iter()
        .map(|r| {
            let ops = r
                .configs
                .iter()
                .map(|c| match &c.value {
                    Some(v) => Ok(ConfigOp::Set(c.name.to_string(), v.to_string())),
                    None => Ok(ConfigOp::Delete(c.name.to_string())),
                })
                .collect();
            check(&shard, &image, r.resource_type, r.resource_name.as_str(), true, ops)
        })
        .collect();
    let outcome = run_changes(&shard, ApiKey::AlterConfigs, checked, req.validate_only).await;
    let responses = req
        .resources
        .iter()
        .zip(outcome)
        .map(|(r, o)| {
            let out = alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            match o {
                None => out,
                Some((code, msg)) => out.with_error_code(code.code()).with_error_message(Some(str_bytes(&msg))),
            }
        })
        .collect();
    encode(ApiKey::AlterConfigs, version, cid, &AlterConfigsResponse::default().with_responses(responses))
}

pub async fn incremental_alter_configs(
    shard: Rc<Shard>,
    version: i16,
    cid: i32,
    req: IncrementalAlterConfigsRequest,
) -> Response {
    let image = shard.image();
    let checked: Vec<Checked> = req
        .resources
        .iter()
        .map(|r| {
            let ops = r
                .configs
                .iter()
                .map(|c| {
                    ConfigOp::from_wire(c.config_operation, c.name.to_string(), c.value.as_ref().map(|v| v.to_string()))
                })
                .collect();
            check(&shard, &image, r.resource_type, r.resource_name.as_str(), false, ops)
        })
        .collect();
    let outcome = run_changes(&shard, ApiKey::IncrementalAlterConfigs, checked, req.validate_only).await;
    let responses = req
        .resources
        .iter()
        .zip(outcome)
        .map(|(r, o)| {
            let out = incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            match o {
                None => out,
                Some((code, msg)) => out.with_error_code(code.code()).with_error_message(Some(str_bytes(&msg))),
            }
        })
        .collect();
    encode(
        ApiKey::IncrementalAlterConfigs,
        version,
        cid,
        &IncrementalAlterConfigsResponse::default().with_responses(responses),
    )
}
