//! SMS through an HTTP gateway, behind one trait: a generic JSON gateway (what an in-house relay
//! or a test receiver speaks) and Alibaba Cloud SMS (`SendSms`, RPC signature version 1.0).
//! The message ID travels with each request (`id`, Aliyun's `OutId`) so a carrier or relay can
//! recognise a retry.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;

use crate::NotifyError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sms {
    pub id: String,
    /// Mainland mobile number, 11 digits.
    pub to: String,
    /// The whole text, for gateways that take free text.
    pub text: String,
    /// Template parameters, for carriers that only send registered templates (Aliyun).
    pub params: BTreeMap<String, String>,
}

pub trait SmsProvider {
    fn send(&self, sms: &Sms) -> impl Future<Output = Result<(), NotifyError>> + Send;
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap_or_default()
}

/// Maps an HTTP outcome: 2xx delivered; 4xx (but 408/429) permanent; the rest retryable.
fn outcome(status: reqwest::StatusCode, body: &str) -> Result<(), NotifyError> {
    if status.is_success() {
        return Ok(());
    }
    let permanent = status.is_client_error() && status != reqwest::StatusCode::REQUEST_TIMEOUT && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
    Err(NotifyError::Delivery { message: format!("gateway answered {status}: {}", body.chars().take(200).collect::<String>()), permanent })
}

fn transport(e: reqwest::Error) -> NotifyError {
    NotifyError::Delivery { message: format!("gateway unreachable: {e}"), permanent: false }
}

/// `POST url` with `{"id", "to", "text"}` and an optional bearer token.
#[derive(Clone, Debug)]
pub struct JsonGateway {
    pub url: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

impl JsonGateway {
    pub fn new(url: &str, token: Option<String>) -> JsonGateway {
        JsonGateway { url: url.to_owned(), token, client: http() }
    }
}

impl SmsProvider for JsonGateway {
    async fn send(&self, sms: &Sms) -> Result<(), NotifyError> {
        let mut req = self.client.post(&self.url).json(&serde_json::json!({ "id": sms.id, "to": sms.to, "text": sms.text }));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.map_err(transport)?;
        let status = res.status();
        outcome(status, &res.text().await.unwrap_or_default())
    }
}

/// Alibaba Cloud SMS settings.
#[derive(Clone, Debug, Deserialize)]
pub struct AliyunConfig {
    /// Default `https://dysmsapi.aliyuncs.com/`.
    #[serde(default = "default_aliyun_endpoint")]
    pub endpoint: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub sign_name: String,
    pub template_code: String,
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_aliyun_endpoint() -> String {
    "https://dysmsapi.aliyuncs.com/".into()
}
fn default_region() -> String {
    "cn-hangzhou".into()
}

#[derive(Clone, Debug)]
pub struct AliyunSms {
    config: AliyunConfig,
    client: reqwest::Client,
}

/// RFC 3986 percent-encoding as Aliyun's signature wants it (space as %20, `~` kept).
pub fn aliyun_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The signature of a parameter set (everything but `Signature`), for `method` (`POST`).
pub fn aliyun_signature(method: &str, params: &BTreeMap<String, String>, secret: &str) -> String {
    let canonical: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", aliyun_encode(k), aliyun_encode(v))).collect();
    let to_sign = format!("{method}&{}&{}", aliyun_encode("/"), aliyun_encode(&canonical.join("&")));
    let Ok(mut mac) = <Hmac<sha1::Sha1> as Mac>::new_from_slice(format!("{secret}&").as_bytes()) else { return String::new() };
    mac.update(to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl AliyunSms {
    pub fn new(config: AliyunConfig) -> AliyunSms {
        AliyunSms { config, client: http() }
    }

    /// The form a `SendSms` request carries, signed.
    pub fn request_params(&self, sms: &Sms) -> BTreeMap<String, String> {
        let now = time::OffsetDateTime::now_utc();
        let timestamp = format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", now.year(), u8::from(now.month()), now.day(), now.hour(), now.minute(), now.second());
        let c = &self.config;
        let mut p: BTreeMap<String, String> = [
            ("AccessKeyId", c.access_key_id.clone()),
            ("Action", "SendSms".into()),
            ("Format", "JSON".into()),
            ("RegionId", c.region.clone()),
            ("SignatureMethod", "HMAC-SHA1".into()),
            ("SignatureNonce", hex::encode(rand::random::<[u8; 16]>())),
            ("SignatureVersion", "1.0".into()),
            ("Timestamp", timestamp),
            ("Version", "2017-05-25".into()),
            ("PhoneNumbers", sms.to.clone()),
            ("SignName", c.sign_name.clone()),
            ("TemplateCode", c.template_code.clone()),
            ("TemplateParam", serde_json::to_string(&sms.params).unwrap_or_else(|_| "{}".into())),
            ("OutId", sms.id.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let signature = aliyun_signature("POST", &p, &c.access_key_secret);
        p.insert("Signature".into(), signature);
        p
    }
}

#[derive(Deserialize)]
struct AliyunReply {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

impl SmsProvider for AliyunSms {
    async fn send(&self, sms: &Sms) -> Result<(), NotifyError> {
        let res = self.client.post(&self.config.endpoint).form(&self.request_params(sms)).send().await.map_err(transport)?;
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        outcome(status, &body)?;
        let reply: AliyunReply =
            serde_json::from_str(&body).map_err(|e| NotifyError::Delivery { message: format!("unreadable reply {body:?}: {e}"), permanent: false })?;
        match reply.code.as_str() {
            "OK" => Ok(()),
            // Flow control and throttling pass; everything else (bad number, template) will not.
            c if c.contains("LIMIT_CONTROL") || c.starts_with("Throttling") || c == "ServiceUnavailable" => {
                Err(NotifyError::Delivery { message: format!("{c}: {}", reply.message), permanent: false })
            }
            c => Err(NotifyError::Delivery { message: format!("{c}: {}", reply.message), permanent: true }),
        }
    }
}

/// The configured carrier.
#[derive(Clone, Debug)]
pub enum SmsGateway {
    Json(JsonGateway),
    Aliyun(AliyunSms),
}

impl SmsProvider for SmsGateway {
    async fn send(&self, sms: &Sms) -> Result<(), NotifyError> {
        match self {
            SmsGateway::Json(g) => g.send(sms).await,
            SmsGateway::Aliyun(g) => g.send(sms).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Alibaba Cloud's RPC signature documentation (its parameters, its
    /// secret "testSecret"), which the documentation signs to this value.
    #[test]
    fn aliyun_signature_matches_the_documented_example() {
        let params: BTreeMap<String, String> = [
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", "{\"customer\":\"test\"}"),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(aliyun_signature("GET", &params, "testSecret"), "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
    }

    #[test]
    fn encoding_is_rfc3986() {
        assert_eq!(aliyun_encode("a b*~/"), "a%20b%2A~%2F");
        assert_eq!(aliyun_encode("阿"), "%E9%98%BF");
    }
}
