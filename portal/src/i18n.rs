//! Every user-facing string of the portal, in English and Chinese, in this one catalogue; and
//! locale formatting of dates, numbers and money. The macro makes a missing translation a
//! compile error: each entry must name both languages.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    #[default]
    En,
    Zh,
}

impl Lang {
    pub fn parse(s: &str) -> Option<Lang> {
        match s.trim().to_ascii_lowercase().as_str() {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }
    pub fn html_tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh-CN",
        }
    }
    /// The first of the browser's languages (`Accept-Language`) that the portal speaks.
    pub fn from_accept_language(header: &str) -> Lang {
        let mut best: Option<(f32, Lang)> = None;
        for part in header.split(',') {
            let mut pieces = part.trim().split(';');
            let tag = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = pieces.find_map(|p| p.trim().strip_prefix("q=").and_then(|q| q.parse::<f32>().ok())).unwrap_or(1.0);
            let lang = if tag.starts_with("zh") {
                Lang::Zh
            } else if tag.starts_with("en") {
                Lang::En
            } else {
                continue;
            };
            if best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, lang));
            }
        }
        best.map_or(Lang::En, |(_, l)| l)
    }
}

macro_rules! catalogue {
    ($($key:ident => $en:literal, $zh:literal;)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Msg { $($key,)* }
        impl Msg {
            pub const ALL: &'static [Msg] = &[$(Msg::$key,)*];
            pub fn text(self, lang: Lang) -> &'static str {
                match (self, lang) {
                    $((Msg::$key, Lang::En) => $en, (Msg::$key, Lang::Zh) => $zh,)*
                }
            }
        }
    };
}

catalogue! {
    Brand => "Suanli compute market", "算力共享平台";
    Catalogue => "Catalogue", "资源目录";
    MyLeases => "My leases", "我的租用";
    Supplier => "Supplier", "供应商";
    Operations => "Operations", "运营管理";
    Account => "Account", "账户";
    Login => "Log in", "登录";
    Logout => "Log out", "退出";
    Register => "Register", "注册";
    Language => "中文", "English";
    Username => "Username", "用户名";
    UsernameOrEmail => "Username or email", "用户名或邮箱";
    Email => "Email", "邮箱";
    Phone => "Mobile number", "手机号";
    Password => "Password", "密码";
    PasswordConfirm => "Confirm password", "确认密码";
    RealName => "Real name", "真实姓名";
    IdNumber => "ID card number", "身份证号";
    UserType => "Account type", "用户类型";
    Personal => "Personal", "个人";
    University => "University", "高校";
    Institute => "Research institute", "科研院所";
    Enterprise => "Enterprise", "企业";
    Individual => "Individual", "个人";
    OrgName => "Organisation name", "单位名称";
    CreditCode => "Unified social credit code", "统一社会信用代码";
    LegalRep => "Legal representative", "法定代表人";
    RegisteredCapital => "Registered capital (CNY)", "注册资本（元）";
    Address => "Address", "地址";
    Affiliation => "Affiliation", "所属单位";
    SettlementAccount => "Settlement account", "结算账户";
    Licence => "Business licence (PDF or image)", "营业执照（PDF或图片）";
    Agree => "I have read and agree to the", "我已阅读并同意";
    Terms => "user agreement", "用户协议";
    Federation => "Federation", "联盟";
    FederatedOffers => "Other marketplaces' offers", "联盟成员的算力";
    FederationMembers => "Members", "成员";
    Origin => "Marketplace", "所属平台";
    ConnectedNow => "connected", "已连接";
    NotConnected => "not connected", "未连接";
    OfferAge => "Last offer", "最近报价";
    ThisMember => "this marketplace", "本平台";
    NoFederatedOffers => "No other marketplace offers cards right now.", "目前没有其他平台提供算力。";
    RemoteLeases => "Your leases at other marketplaces", "在其他平台的租用";
    LeaseHere => "Lease", "租用";
    OwnerLease => "Their lease", "对方租用号";
    Charged => "Charged", "已扣费";
    Unreachable => "unreachable", "暂时无法联系";
    GetCertificate => "Certificate for my key", "为我的公钥签发证书";
    PublicKey => "Public key", "公钥";
    Privacy => "privacy policy", "隐私政策";
    And => "and the", "和";
    AsResearcher => "Researcher", "研究用户";
    AsSupplier => "Supplier", "算力供应商";
    RegisteredCheckMail => "Registered. We sent an activation link to your email.", "注册成功，激活链接已发送至您的邮箱。";
    Activated => "Your account is active. You can log in now.", "账户已激活，现在可以登录。";
    PendingReview => "Your email is confirmed. An operator reviews organisation accounts before they can log in.", "邮箱已验证。机构账户需经运营人员审核后方可登录。";
    ActivationFailed => "This activation link is invalid or has expired.", "激活链接无效或已过期。";
    TotpCode => "Authenticator code", "动态验证码";
    Submit => "Submit", "提交";
    Filter => "Filter", "筛选";
    Reset => "Reset", "重置";
    Class => "Class", "类别";
    ClassA => "A — bare metal", "A类 — 裸金属";
    ClassB => "B — virtualized", "B类 — 虚拟化";
    Any => "Any", "不限";
    GpuModel => "GPU model", "GPU型号";
    Vram => "VRAM (GiB)", "显存 (GiB)";
    Cards => "Cards", "卡数";
    IdleCards => "Idle cards", "空闲卡数";
    Memory => "Memory (GiB)", "内存 (GiB)";
    Vcpus => "vCPUs", "虚拟核数";
    Storage => "Local storage", "本地存储";
    Price => "Price per card", "单卡价格";
    MaxPrice => "Max price per card (fen)", "最高单卡价格（分）";
    BillingMode => "Billing mode", "计费方式";
    Hourly => "hourly", "按小时";
    Daily => "daily", "按天";
    Monthly => "monthly", "包月";
    Yearly => "yearly", "包年";
    Region => "Region", "地区";
    Vendor => "Vendor", "厂商";
    Status => "Status", "状态";
    Listed => "listed", "已上架";
    Delisted => "delisted", "已下架";
    Sort => "Sort by", "排序";
    Newest => "newest", "最新";
    PriceLow => "price, low first", "价格从低到高";
    PriceHigh => "price, high first", "价格从高到低";
    MostIdle => "most idle cards", "空闲卡最多";
    MostVram => "most VRAM", "显存最大";
    NoResults => "No clusters match.", "没有符合条件的集群。";
    Results => "clusters", "个集群";
    Details => "Details", "详情";
    Previous => "Previous", "上一页";
    Next => "Next", "下一页";
    UsageInstructions => "Usage instructions", "使用说明";
    Telemetry => "Live monitoring", "实时监控";
    GpuUtil => "GPU utilization (%)", "GPU利用率 (%)";
    Temperature => "Temperature (°C)", "温度 (°C)";
    Power => "Power (W)", "功率 (W)";
    CpuUtil => "CPU utilization (%)", "CPU利用率 (%)";
    Network => "Network (KiB/s)", "网络流量 (KiB/s)";
    Latency => "Latency to platform (ms)", "平台延迟 (ms)";
    Loss => "Packet loss (‰)", "丢包率 (‰)";
    NotMonitored => "Class A clusters are not monitored during leases.", "A类集群租用期间不监控。";
    CardList => "Cards", "GPU卡";
    Idle => "idle", "空闲";
    Reserved => "reserved", "预留";
    Busy => "busy", "忙碌";
    Offline => "offline", "离线";
    Faulty => "faulty", "故障";
    RequestLease => "Request a lease", "申请租用";
    Periods => "Periods", "周期数";
    Nodes => "Nodes", "节点";
    LeaseRequested => "Lease requested.", "租用申请已提交。";
    Lease => "Lease", "租用";
    State => "State", "状态";
    Amount => "Amount", "金额";
    PaidUntil => "Paid until", "到期时间";
    Requested => "Requested", "申请时间";
    VerifyCode => "Verify authorization code", "验证授权码";
    AuthCode => "Authorization code", "授权码";
    Access => "Access", "访问方式";
    SshCommand => "SSH command", "SSH命令";
    KnownHosts => "known_hosts line", "known_hosts 条目";
    VncTunnel => "VNC tunnel", "VNC隧道";
    NewPassword => "Draw a new lease password", "生成新的租用密码";
    EndLease => "End lease", "结束租用";
    SshKeys => "SSH public keys", "SSH公钥";
    AddKey => "Add key", "添加公钥";
    Spend => "Committed spend", "累计消费";
    Earnings => "Committed earnings", "累计收入";
    Available => "Available balance", "可用余额";
    Jobs => "My jobs", "我的作业";
    Job => "Job", "作业";
    Kind => "Kind", "类型";
    Attempts => "Attempts", "尝试次数";
    CardSeconds => "Card-seconds", "卡秒";
    Cost => "Cost", "费用";
    SubmitJob => "Submit a job", "提交作业";
    Output => "Output", "输出";
    Curves => "Curves", "曲线";
    Outputs => "Files it left", "产出文件";
    Cancel => "Cancel", "取消";
    Held => "Held for leases", "租用冻结";
    EarnedLedger => "Earned (after platform fee)", "已结算收入（扣除平台费）";
    Reliability => "Reliability score", "可靠性评分";
    EnrollmentToken => "New agent enrollment token", "生成节点注册令牌";
    MyNodes => "Enrolled nodes", "已注册节点";
    MyClusters => "My clusters", "我的集群";
    Publish => "Publish a cluster", "发布集群";
    Title => "Title", "标题";
    Delist => "Delist", "下架";
    Modify => "Modify", "修改";
    LeaseRequests => "Lease requests", "租用申请";
    Approve => "Approve", "批准";
    Reviews => "Accounts waiting for review", "待审核账户";
    Reject => "Reject", "拒绝";
    Roles => "Roles", "角色";
    AuditLog => "Audit log", "审计日志";
    Actor => "Actor", "操作人";
    Action => "Action", "操作";
    Target => "Target", "对象";
    Outcome => "Outcome", "结果";
    Time => "Time", "时间";
    Profile => "Profile", "个人资料";
    Save => "Save", "保存";
    EnableTotp => "Enable two-factor authentication", "启用双因素认证";
    ApiTokens => "API tokens", "API令牌";
    NewToken => "New token", "新建令牌";
    Deregister => "Close my account", "注销账户";
    DeregisterWarning => "Ends your live leases and erases your personal data. This cannot be undone.", "将结束您的所有租用并删除个人信息，且无法恢复。";
    ForgotPassword => "Forgot password?", "忘记密码？";
    ResetSent => "If the account exists, a reset link is on its way.", "如账户存在，重置链接已发送。";
    SetPassword => "Set a new password", "设置新密码";
    Required => "required", "必填";
    StateRequested => "requested", "待审批";
    StateApproved => "approved", "已批准";
    StateActive => "active", "使用中";
    StateEnded => "ended", "已结束";
    StateExpired => "expired", "已到期";
    StateCancelled => "cancelled", "已取消";
    None => "none", "无";
    Error => "Something went wrong", "出错了";
    MailActivateSubject => "Activate your Suanli account", "激活您的算力平台账户";
    MailActivateBody => "Welcome to Suanli. Open this link within 24 hours to activate your account:", "欢迎使用算力平台。请在24小时内打开以下链接激活账户：";
    MailResetSubject => "Reset your Suanli password", "重置您的算力平台密码";
    MailResetBody => "Someone asked to reset your password. Open this link within 1 hour to set a new one; if it was not you, ignore this mail:", "有人申请重置您的密码。请在1小时内打开以下链接设置新密码；如非本人操作，请忽略本邮件：";
    MailIgnore => "If you did not register, ignore this mail.", "如果您没有注册，请忽略本邮件。";
    AlertPrefix => "[Suanli] Alert", "[算力平台] 告警";
    ResolvedPrefix => "[Suanli] Resolved", "[算力平台] 已恢复";
    NoticePrefix => "[Suanli]", "[算力平台]";
    ProblemLost => "fell off the bus", "掉卡";
    ProblemOverheat => "is overheating", "温度过高";
    ProblemXid => "reports XID errors", "出现XID错误";
    ProblemSilent => "node offline: its agent stopped reporting", "节点离线：代理停止上报";
    CardOn => "card", "号卡";
    LeaseRequestedNotice => "a lease was requested; approve it in the portal", "有新的租用申请，请在平台上审批";
    LeaseExpiringNotice => "lease ends soon", "租用即将到期";
    JobSucceededNotice => "job finished", "作业已完成";
    JobFailedNotice => "job failed", "作业失败";
    BalanceLowNotice => "available balance is low", "可用余额不足";
    Alerts => "Alerts", "告警";
    NotificationSettings => "Notifications", "通知设置";
    EmailOn => "Email", "邮件";
    SmsOn => "SMS", "短信";
    WebhookUrl => "Webhook URL", "Webhook 地址";
    WebhookSecret => "Webhook secret", "Webhook 密钥";
    QuietHours => "Quiet hours (UTC+8, HH:MM–HH:MM; SMS and webhooks wait)", "免打扰时段（北京时间 HH:MM–HH:MM，短信和Webhook延后）";
    Delivery => "Delivery", "投递";
    PhoneCode => "SMS verification code", "短信验证码";
    SendCode => "Send the code", "发送验证码";
    SmsCodeText => "Suanli verification code (valid 10 minutes):", "算力平台验证码（10分钟内有效）：";
    Datasets => "Datasets", "数据集";
    Dataset => "Dataset", "数据集";
    Models => "Models", "模型";
    Name => "Name", "名称";
    Description => "Description", "描述";
    Owner => "Owner", "所有者";
    LatestVersion => "Latest version", "最新版本";
    Files => "Files", "文件数";
    NewDataset => "New dataset", "新建数据集";
    NoDatasets => "No datasets yet: create one below, then upload pictures to it.", "还没有数据集：请在下方新建，然后上传图片。";
    SharedWithMe => "shared with me", "他人共享";
    Versions => "Versions", "版本";
    Version => "Version", "版本";
    Message => "Message", "说明";
    Bytes => "Size", "大小";
    Added => "Added", "新增";
    Removed => "Removed", "删除";
    Changed => "Modified", "修改";
    Created => "Created", "创建时间";
    NoVersions => "No version yet: upload files to make the first.", "还没有版本：上传文件即生成第一个版本。";
    LabelCounts => "Labels", "标签统计";
    Label => "Label", "标签";
    Count => "Count", "数量";
    Unlabelled => "(no label)", "（无标签）";
    Pictures => "Pictures", "图片";
    FirstFiles => "the first 200 files", "前200个文件";
    RejectedFiles => "Rejected files", "被拒绝的文件";
    Reason => "Reason", "原因";
    NoRejected => "Every file was taken.", "所有文件均已导入。";
    Shares => "Shared with", "共享给";
    ShareWith => "Share with (username)", "共享给（用户名）";
    Share => "Share", "共享";
    Unshare => "Stop sharing", "取消共享";
    NotShared => "Not shared with anyone.", "尚未共享给任何人。";
    UploadFiles => "Upload a new version", "上传新版本";
    DropHere => "Drop files or folders here, or choose them:", "将文件或文件夹拖到此处，或选择：";
    ChooseFiles => "Files", "选择文件";
    ChooseFolder => "A folder", "选择文件夹";
    LabelsFromFolders => "Labels from folders (the first folder of a name is its class)", "按文件夹生成标签（名称中的第一级文件夹即类别）";
    Upload => "Upload", "上传";
    Pause => "Pause", "暂停";
    Resume => "Resume", "继续";
    ChooseFirst => "Choose files or a folder first.", "请先选择文件或文件夹。";
    Hashing => "hashing", "计算校验值";
    Queued => "waiting", "等待中";
    Uploading => "uploading", "上传中";
    Paused => "paused", "已暂停";
    Done => "done", "完成";
    Failed => "failed", "失败";
    Committing => "Importing the files…", "正在导入文件…";
    Skipped => "skipped", "已跳过";
    EmptyFile => "an empty file is not sent", "空文件不上传";
    TooManyFiles => "Too many files for one upload from the page: pack the folder as a .tar or .tar.gz and upload that, or use suanli data push. Files chosen, and the most:", "网页一次上传的文件过多：请将文件夹打包为 .tar 或 .tar.gz 后上传，或使用 suanli data push。已选文件数与上限：";
    SomeFailed => "Some files did not upload: fix them, or upload again to retry.", "部分文件上传失败：请处理后再次上传重试。";
    NewVersionMade => "New version", "新版本";
    NothingChanged => "Nothing changed: the latest version stays", "没有变化：仍为最新版本";
    Duplicates => "Duplicates", "重复文件";
    Rejected => "Rejected", "被拒绝";
    MyModels => "My models", "我的模型";
    ImageSearch => "Image search", "以图搜图";
    Annotation => "Annotation", "标注";
    AnnotationProjects => "Annotation projects", "标注项目";
    NoProjects => "No annotation projects yet.", "尚无标注项目。";
    Role => "Role", "角色";
    Progress => "Progress", "进度";
    StartAnnotating => "Annotate the next task", "标注下一个任务";
    NothingLeft => "No task is waiting for you.", "没有等待您的任务。";
    MyTasks => "My tasks", "我的任务";
    Open => "Open", "打开";
    Undo => "Undo", "撤销";
    Redo => "Redo", "重做";
    PreviousImage => "Previous", "上一张";
    NextImage => "Next", "下一张";
    CopyPrevious => "Copy previous image's shapes", "复制上一张的标注";
    AcceptPre => "Accept pre-annotations", "接受预标注";
    FitImage => "Fit", "适应窗口";
    DeleteShape => "Delete", "删除";
    SelectTool => "Select", "选择";
    BoxTool => "Box", "矩形框";
    PolygonTool => "Polygon", "多边形";
    PolylineTool => "Line", "折线";
    PointsTool => "Points", "关键点";
    BrushTool => "Brush", "画笔";
    EraserTool => "Eraser", "橡皮擦";
    Shortcuts => "Keys: b box · p polygon · l line · k points · m brush · e eraser · [ ] brush size · v select · 1–9 label · Enter finish polygon or line · Esc cancel · Delete remove · Ctrl+Z / Ctrl+Shift+Z undo/redo · c copy previous · a accept pre-annotations · ← → images · wheel zoom · Shift+drag pan · f fit", "快捷键：b 矩形框 · p 多边形 · l 折线 · k 关键点 · m 画笔 · e 橡皮擦 · [ ] 画笔大小 · v 选择 · 1–9 类别 · Enter 完成多边形或折线 · Esc 取消 · Delete 删除 · Ctrl+Z / Ctrl+Shift+Z 撤销/重做 · c 复制上一张 · a 接受预标注 · ← → 切换图片 · 滚轮缩放 · Shift+拖动平移 · f 适应窗口";
    Dashboard => "Dashboard", "看板";
    ImagesComplete => "Images complete", "已完成图片";
    Agreement => "Agreement", "一致性";
    Conflicts => "Conflicts", "冲突";
    Undecided => "Undecided", "待裁决";
    Annotators => "Annotators", "标注员";
    HoneypotScore => "Honeypot score", "质检题得分";
    TimeSpent => "Time spent", "用时";
    ImagesPerHour => "Images per hour", "每小时图片数";
    Review => "Review", "审核";
    NoConflicts => "No conflicts wait for a decision.", "没有待裁决的冲突。";
    MissingBy => "left out by", "未标注者";
    LabelsDiffer => "labels differ", "类别不一致";
    AcceptShape => "Accept", "采纳";
    RejectObject => "Reject", "驳回";
    Export => "Export", "导出";
    NoEmbedder => "This portal has no image embedder configured: search and indexing are off.", "本门户未配置图像特征服务：搜索与索引不可用。";
    QueryImage => "Query picture", "查询图片";
    CropHint => "Drag over the picture to search by a part of it.", "在图片上拖动框选，可只按其中一部分搜索。";
    Library => "Library", "图库";
    LibraryAll => "Mine and global", "我的与公共图库";
    LibraryMine => "Mine", "我的图库";
    LibraryGlobal => "Global", "公共图库";
    Top => "Results", "结果数";
    SearchImages => "Search", "搜索";
    Libraries => "Libraries and indexing", "图库与索引";
    Indexed => "Indexed", "已索引";
    Waiting => "Waiting", "等待中";
    Model => "Model", "模型";
    AddToMyLibrary => "Add to my library", "加入我的图库";
    ContributeToGlobal => "Contribute to the global library (everyone will see these pictures)", "贡献到公共图库（所有人可见）";
    VersionZeroLatest => "Version (0: latest)", "版本（0 为最新）";
    MoreLikeThis => "More like this", "更多相似";
    NoModels => "No models yet. Register a succeeded job's output as a model (on the job's page, suanli model register, or POST /api/v1/models); its versions appear here.", "还没有模型。将成功作业的输出注册为模型（在作业页面、suanli model register 或 POST /api/v1/models）后，其版本会显示在这里。";
    Serving => "Serving", "服务中";
    Metrics => "Metrics", "指标";
    ModelCard => "Model card", "模型卡片";
    Promote => "Promote", "设为服务版本";
    Compare => "Compare", "比较";
    Metric => "Metric", "指标";
    Delta => "Change", "变化";
    Download => "Download", "下载";
    RegisterModel => "Register as a model", "注册为模型";
    ModelName => "Model name", "模型名称";
    ModelFile => "The file that is the model", "模型文件";
    ResubmitWithChanges => "Resubmit with changes", "修改后重新提交";
    Services => "Services on leased cards", "租用卡上的服务";
    DeployDemo => "Deploy as a demo", "部署为演示";
    DeployOnLease => "On lease", "部署到租约";
    NoActiveLease => "A demo runs on an active lease of yours: lease cards first.", "演示运行在您生效中的租约上：请先租用算力卡。";
    WhoMayOpen => "Who may open it", "谁可以打开";
    OnlyMe => "Only me", "仅自己";
    AnyoneWithLink => "Anyone with the link", "持有链接的任何人";
    PublicListed => "Public (listed)", "公开（列出）";
    OpenService => "Open", "打开";
    StopService => "Stop", "停止";
    Requests => "Requests", "请求数";
    Terminal => "Terminal", "终端";
    OpenTerminal => "Open a terminal in the browser", "在浏览器中打开终端";
    OpenJupyter => "Open JupyterLab", "打开 JupyterLab";
    DatasetInputs => "Datasets a spec may name as inputs ({name: data.tar, dataset: NAME@VERSION})", "作业规格可引用为输入的数据集（{name: data.tar, dataset: 名称@版本}）";
}

/// Formats minor units as money with two decimals and thousands separators: `¥42,500.00`.
pub fn money(currency: &str, minor: i64, _lang: Lang) -> String {
    let symbol = match currency {
        "CNY" => "¥",
        "USD" => "$",
        "EUR" => "€",
        _ => "",
    };
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let (units, cents) = (abs / 100, abs % 100);
    let text = if symbol.is_empty() { format!("{sign}{} {currency}", group(units)) } else { format!("{sign}{symbol}{}", group(units)) };
    if symbol.is_empty() {
        text.replacen(' ', &format!(".{cents:02} "), 1)
    } else {
        format!("{text}.{cents:02}")
    }
}

pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A UTC time in the locale's order: `2026-12-01 09:30 UTC` / `2026年12月01日 09:30 (UTC)`.
pub fn datetime(ms: i64, lang: Lang) -> String {
    if ms <= 0 {
        return "—".into();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm) = (rem / 3600, rem % 3600 / 60);
    match lang {
        Lang::En => format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC"),
        Lang::Zh => format!("{y:04}年{m:02}月{d:02}日 {hh:02}:{mm:02} (UTC)"),
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_has_both_languages_and_they_differ() {
        for m in Msg::ALL {
            assert!(!m.text(Lang::En).is_empty() && !m.text(Lang::Zh).is_empty(), "{m:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(money("CNY", 4_250_000, Lang::En), "¥42,500.00");
        assert_eq!(money("CNY", 5, Lang::Zh), "¥0.05");
        assert_eq!(money("CNY", -123_456_789, Lang::En), "-¥1,234,567.89");
        assert_eq!(money("JPY", 100, Lang::En), "1.00 JPY");
        assert_eq!(datetime(1_764_581_400_000, Lang::En), "2025-12-01 09:30 UTC");
        assert_eq!(datetime(1_764_581_400_000, Lang::Zh), "2025年12月01日 09:30 (UTC)");
        assert_eq!(datetime(951_782_400_000, Lang::En), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn accept_language() {
        assert_eq!(Lang::from_accept_language("zh-CN,zh;q=0.9,en;q=0.8"), Lang::Zh);
        assert_eq!(Lang::from_accept_language("en-US,en;q=0.9,zh;q=0.8"), Lang::En);
        assert_eq!(Lang::from_accept_language("fr;q=1,zh;q=0.5"), Lang::Zh);
        assert_eq!(Lang::from_accept_language(""), Lang::En);
    }
}
