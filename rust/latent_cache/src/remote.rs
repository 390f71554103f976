//! An S3-compatible bucket, read as SimpleTuner 4.10.1's `type: aws` backend reads it
//! (helpers/data_backend/aws.py): objects listed under a raw key prefix (a string, not a folder: `img` also lists
//! `img2/a.png`), recursively, every page; each object read whole.
//!
//! Requests go through Apache Arrow's `object_store` (SigV4 signing, retries with exponential backoff on 5xx, throttling,
//! timeouts and dropped connections; a body cut short is resumed with a ranged GET). Credentials are held by the client
//! only: nothing here formats them.
use crate::error::{CacheError, Result};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// Where a bucket is and who reads it: SimpleTuner's `aws_*` keys of a dataset entry.
#[derive(Clone)]
pub struct BucketConfig {
    /// `aws_endpoint_url` (an S3-compatible server; `http://` is allowed).
    pub endpoint: String,
    /// `aws_bucket_name`.
    pub bucket: String,
    /// `aws_region_name` (signing region; SimpleTuner leaves it to botocore, which signs for us-east-1 by default).
    pub region: String,
    /// `aws_access_key_id`.
    pub access_key_id: String,
    /// `aws_secret_access_key`.
    pub secret_access_key: String,
    /// `aws_session_token`, when the credentials are temporary.
    pub session_token: Option<String>,
}

/// How hard a read tries.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Attempts after the first, per request.
    pub retries: usize,
    /// Wait before the first retry; doubles each time, up to 8 times this.
    pub backoff: Duration,
    /// Limit of one request, from connecting to the last byte.
    pub timeout: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience { retries: 5, backoff: Duration::from_millis(200), timeout: Duration::from_secs(60) }
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Its key in the bucket (SimpleTuner's name of the sample).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag, which changes with the object's bytes.
    pub e_tag: Option<String>,
    /// Last modification, ns since the epoch.
    pub last_modified_ns: i64,
}

/// An open bucket: a client and the runtime its requests run on.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    name: String,
}

impl Bucket {
    /// A client for `config`. Nothing is requested yet.
    pub fn open(config: &BucketConfig, patience: Patience) -> Result<Bucket> {
        // One process-wide TLS provider; a second install (another bucket) is refused and harmless. ring, not aws-lc:
        // it builds without a C toolchain in a third of the time; S3 needs no post-quantum key exchange.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let retry = RetryConfig {
            max_retries: patience.retries,
            retry_timeout: patience.timeout * (patience.retries as u32 + 1),
            backoff: BackoffConfig { init_backoff: patience.backoff, max_backoff: patience.backoff * 8, base: 2.0 },
        };
        let client = ClientOptions::new().with_allow_http(true).with_timeout(patience.timeout);
        let mut builder = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(token) = &config.session_token {
            builder = builder.with_token(token);
        }
        let location = format!("s3://{}", config.bucket);
        let store = builder.build().map_err(|e| CacheError::Remote { location: location.clone(), reason: e.to_string() })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| CacheError::Remote { location, reason: e.to_string() })?;
        Ok(Bucket { store: Arc::new(store), runtime, name: config.bucket.clone() })
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<Object>> {
        // object_store lists below a folder; the folder holding the prefix's last '/' holds every match.
        let folder = prefix.rfind('/').map_or("", |at| &prefix[..at]);
        // `parse` takes a key as it is; `from` would percent-encode it (twice, once more in the URL).
        let under = match folder {
            "" => None,
            folder => Some(ObjectPath::parse(folder).map_err(|e| self.error(prefix, e))?),
        };
        let mut listed = Vec::new();
        self.runtime.block_on(async {
            let mut stream = self.store.list(under.as_ref());
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| self.error(prefix, e))?;
                let key = meta.location.to_string();
                if key.starts_with(prefix) {
                    listed.push(Object {
                        key,
                        size: meta.size,
                        e_tag: meta.e_tag,
                        last_modified_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    });
                }
            }
            Ok::<_, CacheError>(())
        })?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    /// The bytes of each object of `keys` (in order), at most `concurrency` requests at a time; a key that stays
    /// unreadable gets why (a deleted object: "not found").
    pub fn get_all(&self, keys: &[String], concurrency: usize) -> Vec<std::result::Result<Vec<u8>, String>> {
        self.runtime.block_on(async {
            futures::stream::iter(keys.iter().map(|key| self.get(key)))
                .buffered(concurrency.max(1))
                .collect()
                .await
        })
    }

    async fn get(&self, key: &str) -> std::result::Result<Vec<u8>, String> {
        let location = ObjectPath::parse(key).map_err(|e| format!("a key the client cannot address: {e}"))?;
        // The client retries the request and resumes a body cut short (a ranged GET of the rest, checked against the
        // ETag); what still fails here is not worth repeating.
        let response = match self.store.get(&location).await {
            Ok(response) => response,
            Err(object_store::Error::NotFound { .. }) => return Err("not found (deleted since it was listed?)".into()),
            Err(e) => return Err(one_line(e)),
        };
        let expected = response.meta.size;
        match response.bytes().await {
            Ok(bytes) if bytes.len() as u64 == expected => Ok(bytes.to_vec()),
            Ok(bytes) => Err(format!("{} of its {expected} bytes arrived", bytes.len())),
            Err(e) => Err(one_line(e)),
        }
    }

    /// Writes `data` as the object `key` (one PUT, retried as reads are) and returns its ETag. SimpleTuner keeps an S3
    /// dataset's bucket files in the bucket; the trainer's data path writes them there as SimpleTuner would.
    pub fn put(&self, key: &str, data: Vec<u8>) -> Result<Option<String>> {
        let location = ObjectPath::parse(key).map_err(|e| self.error(key, e))?;
        let written = self.runtime.block_on(self.store.put(&location, data.into())).map_err(|e| self.error(key, e))?;
        Ok(written.e_tag)
    }

    /// The object `key` as listed (size, ETag, last modification), or None when there is none.
    pub fn head(&self, key: &str) -> Result<Option<Object>> {
        let location = ObjectPath::parse(key).map_err(|e| self.error(key, e))?;
        match self.runtime.block_on(self.store.head(&location)) {
            Ok(meta) => Ok(Some(Object {
                key: key.to_string(),
                size: meta.size,
                e_tag: meta.e_tag,
                last_modified_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    fn error(&self, prefix: &str, e: impl std::fmt::Display) -> CacheError {
        CacheError::Remote { location: format!("s3://{}/{prefix}", self.name), reason: one_line(e) }
    }
}

/// An error as one line of a report: a server's XML error document (S3 puts one in the body of a failed answer, and
/// the client quotes it) reduced to its code and message, and every run of whitespace to one space.
fn one_line(error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let text = match (text.find("<?xml"), xml_text(&text, "Code"), xml_text(&text, "Message")) {
        (Some(at), Some(code), Some(message)) => format!("{}{code}: {message}", &text[..at]),
        _ => text,
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn xml_text<'a>(text: &'a str, element: &str) -> Option<&'a str> {
    let start = text.find(&format!("<{element}>"))? + element.len() + 2;
    let end = start + text[start..].find(&format!("</{element}>"))?;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_bucket() -> Bucket {
        let config = BucketConfig {
            endpoint: "http://127.0.0.1:9".into(), // the discard port: nothing answers
            bucket: "data".into(),
            region: "us-east-1".into(),
            access_key_id: "key".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        };
        Bucket::open(&config, Patience { retries: 1, backoff: Duration::from_millis(1), timeout: Duration::from_secs(2) })
            .unwrap()
    }

    #[test]
    fn a_servers_error_document_becomes_one_line_with_its_code_and_message() {
        let quoted = "Error performing GET http://h/b/k in 1.3s, after 5 retries - Server returned non-2xx status \
                      code: 500 Internal Server Error: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>\
                      InternalError</Code><Message>We encountered an internal error.</Message><RequestId>7</RequestId>\
                      </Error>";
        assert_eq!(
            one_line(quoted),
            "Error performing GET http://h/b/k in 1.3s, after 5 retries - Server returned non-2xx status code: 500 \
             Internal Server Error: InternalError: We encountered an internal error."
        );
        assert_eq!(one_line("a\n  b\t c"), "a b c");
        assert_eq!(one_line("<?xml no elements"), "<?xml no elements");
    }

    #[test]
    fn an_unreachable_server_is_an_error_per_key_not_a_panic() {
        let bucket = unreachable_bucket();
        let got = bucket.get_all(&["a.png".to_string(), "b.png".to_string()], 2);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.is_err()));
        let listed = bucket.list("images/").unwrap_err().to_string();
        assert!(listed.contains("s3://data/images/"), "{listed}");
        let written = bucket.put("images/a.json", b"{}".to_vec()).unwrap_err().to_string();
        assert!(written.contains("s3://data/images/a.json"), "{written}");
        assert!(bucket.head("images/a.json").is_err());
    }
}
