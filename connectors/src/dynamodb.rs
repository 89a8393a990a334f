//! The state store on AWS: one DynamoDB table, an item per key.
//!
//! Items are `{pk: S, version: N, value: S (JSON text), updated_at: S}`. A write is a
//! `PutItem` conditioned on the version it read (`attribute_not_exists(pk)` for a new key),
//! so a stale writer meets `ConditionalCheckFailedException` and gets
//! [`ConnectorError::StateConflict`] instead of overwriting. Reads are strongly consistent.
//! Endpoint, region and credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`
//! points it at DynamoDB Local).

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use serde_json::Value;

use crate::error::ConnectorError;
use crate::state::{StateStore, Versioned};

const KEY: &str = "pk";
const VERSION: &str = "version";
const VALUE: &str = "value";
const UPDATED_AT: &str = "updated_at";

/// A [`StateStore`] on a DynamoDB table (`dynamodb://TABLE`).
#[derive(Debug, Clone)]
pub struct DynamoDbStateStore {
    client: Client,
    table: String,
    endpoint: String,
}

impl DynamoDbStateStore {
    /// A store on `table`, with the client configured from the AWS chain. Nothing is sent
    /// until the first request; [`StateStore::check`] tells whether the table is usable.
    pub async fn new(table: impl Into<String>) -> Self {
        let config = aws_config::load_from_env().await;
        let endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|_| {
                format!(
                    "DynamoDB in {}",
                    config
                        .region()
                        .map_or("the default region".to_string(), |r| r.to_string())
                )
            });
        Self {
            client: Client::new(&config),
            table: table.into(),
            endpoint,
        }
    }

    /// An error naming the table, with what the user can do for the common failures.
    fn error<E, R>(&self, doing: &str, error: &SdkError<E, R>) -> ConnectorError
    where
        E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        let code = error
            .as_service_error()
            .and_then(|e| e.code())
            .unwrap_or("");
        let setup = matches!(
            code,
            "ResourceNotFoundException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "AccessDeniedException"
                | "MissingAuthenticationTokenException"
        );
        let reason = match (code, error) {
            ("ResourceNotFoundException", _) => format!(
                "table '{}' does not exist at {}: create it with `medallion init --state dynamodb://{}`",
                self.table, self.endpoint, self.table
            ),
            (
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "AccessDeniedException"
                | "MissingAuthenticationTokenException",
                _,
            ) => format!(
                "{} refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or \
                 the profile or role the AWS chain picked)",
                self.endpoint
            ),
            (_, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => format!(
                "cannot reach {}: check AWS_ENDPOINT_URL and that the service is up",
                self.endpoint
            ),
            (_, SdkError::ConstructionFailure(_)) => format!(
                "cannot build a request to {} (is AWS_REGION set?)",
                self.endpoint
            ),
            _ => String::new(),
        };
        // A service error's code and message say it all; the raw response would bury them.
        let detail = match error.as_service_error() {
            Some(e) => format!("{code}: {}", e.message().unwrap_or_default()),
            None => DisplayErrorContext(error).to_string(),
        };
        let store = self.describe();
        let reason = if reason.is_empty() {
            format!("{doing}: {detail}")
        } else {
            format!("{doing}: {reason} ({detail})")
        };
        if setup {
            ConnectorError::StateStoreSetup { store, reason }
        } else {
            ConnectorError::StateStore { store, reason }
        }
    }

    /// The version an item holds now, for a conflict's message.
    async fn stored_version(&self, key: &str) -> Option<u64> {
        self.get(key).await.ok().flatten().map(|v| v.version)
    }
}

#[async_trait]
impl StateStore for DynamoDbStateStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, ConnectorError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY, AttributeValue::S(key.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error(&format!("reading {key}"), &e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let malformed = |what: &str| ConnectorError::StateStore {
            store: self.describe(),
            reason: format!("item {key}: {what}"),
        };
        let version = item
            .get(VERSION)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| malformed("no numeric version"))?;
        let text = item
            .get(VALUE)
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| malformed("no value"))?;
        let value = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
        Ok(Some(Versioned { value, version }))
    }

    async fn put(
        &self,
        key: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<u64, ConnectorError> {
        let version = expected.map_or(1, |v| v + 1);
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY, AttributeValue::S(key.to_string()))
            .item(VERSION, AttributeValue::N(version.to_string()))
            .item(VALUE, AttributeValue::S(value.to_string()))
            .item(
                UPDATED_AT,
                AttributeValue::S(chrono::Utc::now().to_rfc3339()),
            );
        request = match expected {
            None => request.condition_expression("attribute_not_exists(#k)"),
            Some(v) => request
                .condition_expression("#v = :expected")
                .expression_attribute_names("#v", VERSION)
                .expression_attribute_values(":expected", AttributeValue::N(v.to_string())),
        };
        if expected.is_none() {
            request = request.expression_attribute_names("#k", KEY);
        }
        match request.send().await {
            Ok(_) => Ok(version),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(ConnectorError::StateConflict {
                    key: key.to_string(),
                    expected,
                    found: self.stored_version(key).await,
                })
            }
            Err(e) => Err(self.error(&format!("writing {key}"), &e)),
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("checking the table", &e))
    }

    async fn init(&self) -> Result<(), ConnectorError> {
        let definition = AttributeDefinition::builder()
            .attribute_name(KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| self.build_error(&e))?;
        let key = KeySchemaElement::builder()
            .attribute_name(KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| self.build_error(&e))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(definition)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) =>
            {
                tracing::info!(table = self.table, "the state table exists already");
            }
            Err(e) => return Err(self.error("creating the table", &e)),
        }
        // A new table takes a moment to become ACTIVE on AWS; writes before that fail.
        for _ in 0..120 {
            let status = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| self.error("waiting for the table", &e))?
                .table
                .and_then(|t| t.table_status);
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Err(ConnectorError::StateStore {
            store: self.describe(),
            reason: "the table did not become ACTIVE within 60 s".into(),
        })
    }

    fn describe(&self) -> String {
        format!("dynamodb://{} ({})", self.table, self.endpoint)
    }
}

impl DynamoDbStateStore {
    fn build_error(&self, e: &dyn std::fmt::Display) -> ConnectorError {
        ConnectorError::StateStore {
            store: self.describe(),
            reason: e.to_string(),
        }
    }
}
